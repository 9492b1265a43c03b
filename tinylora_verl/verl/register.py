"""Register :class:`TinyLoRAFSDPEngine` in verl's ``EngineRegistry`` (imported through ``model.external_lib``).

verl resolves an engine by ``(device, vendor)`` first and by ``device`` second, and its stock FSDP engine is
registered under the device alone. Registering ours under this process's ``(device, vendor)`` key makes it win
for both ``fsdp`` and ``fsdp2`` without touching verl; the resolution is then checked, because a TinyLoRA run
that silently got the stock engine would train (or freeze) the wrong parameters.

``actor_rollout_ref.model.external_lib`` imports this in every worker that builds an ``HFModelConfig`` and
raises if the package is missing there: the worker-side half of the missing-plugin guard.
"""

from __future__ import annotations

import os

from verl.utils.device import get_device_name, get_vendor
from verl.workers.engine.base import EngineRegistry

from .engine import TinyLoRAFSDPEngine

MODEL_TYPE = "language_model"
BACKENDS = ("fsdp", "fsdp2")


def engine_key() -> tuple[str, str]:
    """The ``(device, vendor)`` key ``EngineRegistry.get_engine_cls`` will look up in this process."""
    device = os.getenv("VERL_ENGINE_DEVICE") or get_device_name()
    vendor = os.getenv("VERL_ENGINE_VENDOR") or get_vendor()
    return device, vendor


def register() -> None:
    """Idempotently register the engine for this process's key and verify verl resolves to it."""
    device, vendor = engine_key()
    for backend in BACKENDS:
        registry = EngineRegistry._engines.setdefault(MODEL_TYPE, {}).setdefault(backend, {})
        existing = registry.get((device, vendor))
        if existing is None:
            EngineRegistry.register(model_type=MODEL_TYPE, backend=backend, device=device, vendor=vendor)(
                TinyLoRAFSDPEngine
            )
        elif existing is not TinyLoRAFSDPEngine:
            raise RuntimeError(
                f"verl engine key ({device!r}, {vendor!r}) for {backend} is already taken by {existing.__qualname__}; "
                "TinyLoRA cannot register its FSDP engine there"
            )
        resolved = EngineRegistry.get_engine_cls(MODEL_TYPE, backend)
        if resolved is not TinyLoRAFSDPEngine:
            raise RuntimeError(f"verl resolves {backend} to {resolved.__qualname__}, not TinyLoRAFSDPEngine")


register()
