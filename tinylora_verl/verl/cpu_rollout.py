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
"""

from __future__ import annotations

import logging
import os
import time

import ray
import torch

from tinylora_verl.verl.cpu_platform import check_verl_internals
from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightReceiver
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension
from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

check_verl_internals()


class CpuVLLMWorkerExtension(vLLMColocateWorkerExtension):
    """vLLM worker extension whose weight sync goes through ``reload_weights`` (works with CPU-repacked layers)."""

    def update_weights_from_ipc(self, peft_config: dict = None, base_sync_done=False, use_shm: bool = False):
        """Receive the full per-tensor stream over shared memory and reload it in one call."""
        if peft_config:
            raise NotImplementedError(
                f"CPU weight sync supports merged full weights only; got a LoRA peft_config "
                f"(base_sync_done={base_sync_done}). Use merged sync (peft_config=None) on CPU."
            )
        if not use_shm:
            raise RuntimeError(
                "CPU weight sync needs verl's shared-memory transport, but the trainer asked for CUDA IPC "
                "(use_shm=False): the trainer process is not running the tinylora_verl CPU platform "
                "(set TINYLORA_VERL_CPU=1 and VERL_USE_EXTERNAL_MODULES=tinylora_verl.verl.cpu_platform)."
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
        self.reload_weights(weights_iterator=iter(received), is_checkpoint_format=True)
        logger.info(
            "tinylora_verl CPU weight sync: reloaded %d tensors (%.1f MB) in %.2fs",
            len(received),
            num_bytes / 2**20,
            time.time() - start,
        )


class CpuVLLMHttpServer(vLLMHttpServer):
    """verl's vLLM server with the CPU weight-sync worker extension."""

    def _get_worker_extension_cls(self) -> str:
        return f"{CpuVLLMWorkerExtension.__module__}.{CpuVLLMWorkerExtension.__qualname__}"


class CpuVLLMReplica(vLLMReplica):
    """verl's vLLM replica launching :class:`CpuVLLMHttpServer` actors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(CpuVLLMHttpServer)
