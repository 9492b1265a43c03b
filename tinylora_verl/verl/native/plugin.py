"""vLLM general plugin (entry point ``vllm.general_plugins: tinylora_native``): native TinyLoRA in every worker.

vLLM calls :func:`register` once in each of its processes (``load_general_plugins``: the engine core and every
worker, before the model is built). It wraps ``BaseModelLoader.load_model`` (the one method every loader, dummy
included, goes through in vLLM 0.24 and 0.31) so that a model loaded with
``additional_config={"tinylora_native": {"rank": R}}`` gets TinyLoRA's buffers and wrapped GEMMs
(:func:`tinylora_verl.verl.native.model.attach`) before its first forward, hence before torch.compile and CUDA
graph capture. Any other model is untouched. ``additional_config`` is part of vLLM's compile-cache key, so a graph
compiled without the update is never reused for a run with it.

verl's server (:class:`tinylora_verl.verl.native.server.TinyLoRAVLLMHttpServer`) sets that key when the actor's
``tinylora.sync_mode`` is ``native``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

logger = logging.getLogger(__name__)

CONFIG_KEY = "tinylora_native"
_WRAPPED = "_tinylora_native_wrapped"


def native_rank(additional_config: Any) -> Optional[int]:
    """The rank asked for in vLLM's ``additional_config``, or None when native mode is off."""
    if not isinstance(additional_config, dict) or CONFIG_KEY not in additional_config:
        return None
    spec = additional_config[CONFIG_KEY]
    rank = spec.get("rank") if isinstance(spec, dict) else None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"additional_config.{CONFIG_KEY} should be {{'rank': <int >= 1>}}, but the value passed is "
                         f"{spec!r}")
    return rank


def register() -> None:
    """Wrap ``BaseModelLoader.load_model`` (idempotent)."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    original = BaseModelLoader.load_model
    if getattr(original, _WRAPPED, False):
        return

    def load_model(self, vllm_config, model_config, *args, **kwargs):
        model = original(self, vllm_config, model_config, *args, **kwargs)
        rank = native_rank(getattr(vllm_config, "additional_config", None))
        if rank is not None:
            from .model import attach

            attach(model, rank)
        return model

    setattr(load_model, _WRAPPED, True)
    load_model.__wrapped__ = original
    BaseModelLoader.load_model = load_model
