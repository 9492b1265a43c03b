"""The verl (and vLLM) this integration is written against: the version pin and every internal it touches.

The engine subclasses verl's FSDP engine, the CPU platform registers itself and patches verl's process-group
helper, the CPU rollout subclasses verl's vLLM server and worker extension, and ``sync_mode: lora`` on CPU uses
verl's tensor-LoRA request. Each internal is listed in :data:`REQUIRED_VERL_INTERNALS` with the reason, and
:func:`check_verl_internals` resolves them (``tests/verl/test_compat.py`` runs it, so a verl that moves one fails
loudly there; the CPU rollout runs it when it loads). GPU vLLM is 0.24 (verl 0.9.1's pin), the CPU build 0.31.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

SUPPORTED_VERL_VERSION = "0.9.1"

# Every verl / vLLM internal the integration relies on: (module, dotted attribute), each with why.
REQUIRED_VERL_INTERNALS: tuple[tuple[str, str], ...] = (
    ("verl.plugin.platform.platform_base", "PlatformBase"),
    ("verl.plugin.platform.platform_manager", "PlatformRegistry.register"),
    ("verl.plugin.platform.platform_manager", "set_platform"),
    ("verl.plugin.platform.platform_manager", "get_platform"),
    ("verl.utils.device", "is_support_ipc"),
    ("verl.utils.distributed", "initialize_global_process_group_ray"),
    ("verl.utils.distributed", "initialize_global_process_group"),
    ("verl.workers.engine_workers", "initialize_global_process_group_ray"),
    ("verl.workers.engine.base", "EngineRegistry.get_engine_cls"),
    ("verl.workers.rollout.replica", "RolloutReplicaRegistry.register"),
    ("verl.workers.rollout.replica", "RolloutReplicaRegistry.get"),
    ("verl.third_party.vllm", "VLLM_SLEEP_LEVEL"),
    ("verl.workers.rollout.vllm_rollout.vllm_async_server", "vLLMReplica.__init__"),
    ("verl.workers.rollout.vllm_rollout.vllm_async_server", "vLLMHttpServer._get_worker_extension_cls"),
    ("verl.workers.rollout.vllm_rollout.vllm_rollout", "ServerAdapter.update_weights"),
    ("verl.workers.rollout.vllm_rollout.utils", "vLLMColocateWorkerExtension.update_weights_from_ipc"),
    ("verl.workers.rollout.vllm_rollout.utils", "vLLMColocateWorkerExtension._get_zmq_handle"),
    ("verl.workers.rollout.vllm_rollout.bucketed_weight_transfer", "BucketedWeightReceiver.receive_weights"),
    ("verl.workers.engine.fsdp.transformer_impl", "device_name"),
    # The engine (engine.py): the FSDP engine it subclasses and every method it overrides or calls.
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead._build_module"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead._build_fsdp_module"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead._build_optimizer"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead.optimizer_step"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead.train_batch"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead.get_per_tensor_param"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead.get_per_tensor_param_shard"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead.get_per_tensor_param_delta_shard"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead.save_checkpoint"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead.load_checkpoint"),
    ("verl.workers.engine.fsdp.transformer_impl", "FSDPEngineWithLMHead.disable_adapter"),
    ("verl.workers.engine.base", "EngineRegistry.register"),
    ("verl.workers.engine.base", "EngineRegistry._engines"),
    ("verl.workers.config.optimizer", "build_optimizer"),
    ("verl.utils.device", "get_device_name"),
    ("verl.utils.device", "get_device_id"),
    ("verl.utils.device", "get_vendor"),
    ("verl.utils.tensordict_utils", "get"),
    ("vllm.v1.worker.gpu_worker", "Worker.reload_weights"),
    # sync_mode: lora on CPU (cpu/rollout.py, _load_lora).
    ("verl.utils.vllm", "TensorLoRARequest"),
    ("verl.utils.vllm.utils", "VLLMHijack.hijack"),
    ("verl.workers.rollout.vllm_rollout.utils", "VLLM_LORA_INT_ID"),
    ("vllm.v1.worker.gpu_worker", "Worker.add_lora"),
    ("vllm.v1.worker.gpu_worker", "Worker.list_loras"),
    ("vllm.model_executor.models.utils", "WeightsMapper.get_rename_mapper"),
    # sync_mode: native (verl/native): the server's engine-argument and sleep-level hooks (server.py) ...
    ("verl.workers.rollout.vllm_rollout.vllm_async_server", "vLLMHttpServer._preprocess_engine_kwargs"),
    ("verl.workers.rollout.vllm_rollout.vllm_async_server", "vLLMHttpServer._resolve_sleep_level"),
    # ... the loader method every vLLM loader goes through, wrapped by the plugin (plugin.py) ...
    ("vllm.model_executor.model_loader.base_loader", "BaseModelLoader.load_model"),
    # ... and the layer classes whose local GEMM (quant_method.apply) gets the update, with their shard layout
    # (model.py; the same forward bodies in vLLM 0.24 and 0.31).
    ("vllm.model_executor.layers.linear", "QKVParallelLinear"),
    ("vllm.model_executor.layers.linear", "MergedColumnParallelLinear"),
    ("vllm.model_executor.layers.linear", "ColumnParallelLinear"),
    ("vllm.model_executor.layers.linear", "RowParallelLinear"),
    ("vllm.model_executor.layers.linear", "ReplicatedLinear"),
    ("vllm.model_executor.layers.linear", "UnquantizedLinearMethod.apply"),
)

# The subset activate() may import in every process: no vLLM, no engine or worker modules.
_LIGHT_MODULE_PREFIXES = ("verl.plugin.", "verl.utils.", "verl.workers.rollout.replica")
# ... except verl's vLLM helpers, which import vLLM itself (4 s on the driver, before any config is checked).
_HEAVY_MODULE_PREFIXES = ("verl.utils.vllm",)


def is_light(module_name: str) -> bool:
    """Whether ``activate()`` may import ``module_name`` inside ``import verl`` (see the two prefix lists)."""
    return module_name.startswith(_LIGHT_MODULE_PREFIXES) and not module_name.startswith(_HEAVY_MODULE_PREFIXES)

def require_verl_version() -> str:
    """Return verl's version, raising if it is not the one this layer was written against."""
    try:
        found = importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError as err:
        raise RuntimeError(
            f"tinylora_verl needs verl=={SUPPORTED_VERL_VERSION}; verl is not installed"
        ) from err
    if found != SUPPORTED_VERL_VERSION:
        raise RuntimeError(
            f"tinylora_verl relies on verl internals of {SUPPORTED_VERL_VERSION} only; found verl {found}. "
            f"Re-check every entry of REQUIRED_VERL_INTERNALS before widening the pin."
        )
    return found


def _resolve(module_name: str, dotted_attr: str) -> Any:
    obj = importlib.import_module(module_name)
    for part in dotted_attr.split("."):
        if not hasattr(obj, part):
            raise RuntimeError(
                f"verl internal {module_name}:{dotted_attr} is missing (no {part!r}); "
                f"tinylora_verl supports verl=={SUPPORTED_VERL_VERSION} only."
            )
        obj = getattr(obj, part)
    return obj


def check_verl_internals(light_only: bool = False) -> None:
    """Import and look up every entry of ``REQUIRED_VERL_INTERNALS``; raise naming the first missing one.

    ``light_only`` skips modules that pull in vLLM or the worker stack (used by the CPU platform's ``activate``,
    which runs inside ``import verl``); the full check runs in the test and when the CPU rollout classes load.
    """
    require_verl_version()
    for module_name, attr in REQUIRED_VERL_INTERNALS:
        if light_only and not is_light(module_name):
            continue
        _resolve(module_name, attr)


__all__ = ["REQUIRED_VERL_INTERNALS", "SUPPORTED_VERL_VERSION", "check_verl_internals", "require_verl_version"]
