"""TinyLoRA inside verl 0.9.1's FSDP model engine (a subclass, registered without patching verl).

Build order (``FSDPEngine._build_model_optimizer``): ``_build_module`` (HF ``from_pretrained``) → here TinyLoRA is
injected, factors computed on every rank that holds weights (ranks built on meta get placeholders) →
``_build_fsdp_module`` (FSDP2 broadcasts rank 0's parameters and buffers, so factors reach every rank) →
``_build_optimizer`` over ``v`` only.

``v`` is an engine-owned float32 parameter per tie group, outside FSDP's sharding and mixed precision:
FSDP would shard 13 scalars and hand the forward a bf16 copy. Its gradient is averaged over the
engine's ranks in :meth:`optimizer_step`, matching FSDP's own averaging that verl's loss scaling assumes.

Before each rollout verl streams ``get_per_tensor_param()`` to the inference engine. With ``sync_mode: merged``
that stream is wrapped so every target weight goes out as ``cast(W + ΔW)`` computed in float32 from the pristine
base. With ``sync_mode: lora`` it is replaced by ΔW's exact rank-r LoRA plus a peft config, which verl's worker
(``engine_workers.py``, ``update_weights``) sends as an adapter after one base-weight sync; verl's vLLM server
then serves every request through it. With ``sync_mode: native`` the first sync of this engine's life sends the
pristine base, then each target's frozen factors (the install), then v; every later sync sends only v and its
checksum (:mod:`tinylora_verl.core.native`), which vLLM's TinyLoRA plugin turns into the exact update.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import time
from typing import Optional

import torch
import torch.distributed as dist

from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from ..core import native
from ..core.adapter import MergeStats, TinyLoRAAdapter, inject_tinylora
from ..core.adapter_io import load_adapter_state, save_adapter
from .attention import attention_implementation, check_attention
from .checkpoints import ADAPTER_FILE, STATE_FILE, checkpoints_beyond, rng_state, set_rng_state
from .options import check_lora_settings, parse_tinylora_block, tinylora_block_of

logger = logging.getLogger(__name__)



def available_cpus() -> int:
    """Cores this process may run on (its affinity mask), whatever OMP_NUM_THREADS says."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class TinyLoRAFSDPEngine(FSDPEngineWithLMHead):
    """verl's ``FSDPEngineWithLMHead`` with a TinyLoRA adapter when ``model.lora.tinylora.enable`` is true.

    With TinyLoRA disabled, or for forward-only engines (the reference policy), it is the stock engine.
    """

    def __init__(self, model_config, engine_config, optimizer_config, checkpoint_config):
        super().__init__(model_config, engine_config, optimizer_config, checkpoint_config)
        check_attention(bool(model_config.use_remove_padding), attention_implementation(model_config.override_config),
                        on_gpu=torch.cuda.is_available())
        self.tl_options, config = parse_tinylora_block(tinylora_block_of(model_config))
        self.tl_config = None if engine_config.forward_only else config
        self.tl_adapter: Optional[TinyLoRAAdapter] = None
        self.tl_last_sync: Optional[MergeStats] = None
        self.tl_inject_seconds: Optional[float] = None
        self.tl_nonfinite_steps = 0
        self.tl_native_installed = False
        if self.tl_config is not None:
            check_lora_settings(self.tl_options, self.tl_config, dict(model_config.lora or {}),
                                model_config.lora_rank, model_config.lora_adapter_path)
            if engine_config.strategy != "fsdp2":
                raise ValueError(
                    f"TinyLoRA's engine supports actor.strategy=fsdp2, got {engine_config.strategy!r}: FSDP1 flat "
                    "parameters would need a different weight-sync naming path"
                )

    @property
    def tinylora_enabled(self) -> bool:
        return self.tl_config is not None

    # ------------------------------------------------------------------ build
    def _build_module(self):
        module = super()._build_module()
        if not self.tinylora_enabled:
            return module
        # Rank 0 holds the real weights in host memory here (other ranks are on meta). Its SVDs run on its GPU when
        # it has one (one batch of weights on the device at a time), else on every core this process may use: Ray
        # starts actors with OMP_NUM_THREADS=1, which would leave a 7B model's 196 SVDs to one core.
        device = self._tl_device()
        start = time.perf_counter()
        self.tl_adapter = inject_tinylora(module, self.tl_config, device=None if device.type == "cpu" else device,
                                          threads=available_cpus() if device.type == "cpu" else None)
        seconds = self.tl_inject_seconds = time.perf_counter() - start
        # Harmless with verl's non-reentrant checkpointing and required with a reentrant one: frozen inputs
        # would otherwise cut the graph before the adapted linears.
        module.enable_input_require_grads()
        if self.rank == 0:
            plan = self.tl_adapter.tie_plan
            logger.warning(
                "[tinylora] injected into %d modules: %d trainable (u=%d, %d per %s group, r=%d); factors on %s in "
                "%.1f s", len(plan.module_names), plan.num_params, plan.u, plan.tie_size, plan.mode, self.tl_config.r,
                device if device.type != "cpu" else f"cpu ({available_cpus()} threads)", seconds,
            )
        return module

    def _build_fsdp_module(self, module):
        module = super()._build_fsdp_module(module)
        if self.tinylora_enabled:
            self.tl_adapter.to(self._tl_device())
            self._check_factors_agree()
        return module

    def _tl_device(self) -> torch.device:
        from verl.utils.device import get_device_id, get_device_name

        name = get_device_name()
        return torch.device("cpu") if name == "cpu" else torch.device(name, get_device_id())

    def _check_factors_agree(self) -> None:
        """Every rank must hold rank 0's factors (verl's FSDP2 load broadcasts buffers); fail loudly if not."""
        if dist.get_world_size() == 1:
            return
        factors = (self.tl_adapter.factors(name) for name in self.tl_adapter.module_names)
        probe = torch.stack([S.sum() + U.sum() for U, S, _, _ in factors])  # (modules,)
        lo, hi = probe.clone(), probe.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError("TinyLoRA factors differ across ranks after FSDP load: buffer broadcast did not happen")

    def _build_optimizer(self, module):
        if not self.tinylora_enabled:
            return super()._build_optimizer(module)
        from verl.workers.config.optimizer import build_optimizer

        return build_optimizer(self.tl_adapter.parameters(), self.optimizer_config)

    # ------------------------------------------------------------------ train step
    def optimizer_step(self):
        """Average v's gradient over ranks, clip, step; return the norm before clipping.

        A step whose gradient norm is not finite is skipped, and so is one whose update leaves a non-finite v (v is
        put back). After ``max_nonfinite_steps`` such steps in a row the run stops: its checkpoints all hold the
        finite v of the last good step.
        """
        if not self.tinylora_enabled:
            return super().optimizer_step()
        params = [p for p in self.tl_adapter.parameters() if p.grad is not None]
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            # SUM then divide: gloo (CPU) has no ReduceOp.AVG.
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= world
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=self.optimizer_config.clip_grad)
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            before = [p.detach().clone() for p in self.tl_adapter.parameters()]
            self.optimizer.step()
            finite = all(bool(torch.isfinite(p).all()) for p in self.tl_adapter.parameters())
            if not finite:
                with torch.no_grad():
                    for p, old in zip(self.tl_adapter.parameters(), before):
                        p.copy_(old)
        if finite:
            self.tl_nonfinite_steps = 0
            return grad_norm.item()
        self.optimizer.zero_grad()
        self.tl_nonfinite_steps += 1
        limit = self.tl_options.max_nonfinite_steps
        if self.rank == 0:
            logger.warning("[tinylora] grad_norm is %s: skipping this optimizer step (%d in a row of at most %d)",
                           grad_norm.item(), self.tl_nonfinite_steps, limit)
        if self.tl_nonfinite_steps >= limit:
            raise RuntimeError(
                f"TinyLoRA: {self.tl_nonfinite_steps} optimizer steps in a row had a non-finite gradient or update "
                f"(limit tinylora.max_nonfinite_steps={limit}); stopping. v is still the last finite one "
                f"{[round(x, 6) for x in self._v().tolist()]}, and every checkpoint holds a finite v: lower the "
                "learning rate or check the reward and data, then resume")
        return grad_norm.item()

    def _v(self) -> torch.Tensor:
        return torch.cat([p.detach().float().reshape(-1).cpu() for p in self.tl_adapter.parameters()])

    def train_batch(self, data, loss_function):
        from verl.utils import tensordict_utils as tu

        # Read before super(): the flag marks the step's last mini-batch, after which v is the step's v.
        last_mini_batch = tu.get(data, key="update_lr_scheduler", default=False)
        outputs = super().train_batch(data, loss_function)
        if self.tinylora_enabled and last_mini_batch and self.is_mp_src_rank_with_outputs():
            # Reported once per step (verl averages a metric over mini-batches, which would blur v), as
            # one-element lists like verl's per-micro-batch metrics: the worker all-gathers and flattens them.
            outputs["metrics"].update({k: [v] for k, v in self.tinylora_metrics().items()})
        return outputs

    def sync_metrics(self) -> dict[str, float]:
        """This process's peak RSS (the trainer's memory; vLLM runs in its own processes) and the last sync's bytes
        and seconds."""
        metrics = {"perf/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
        if self.tl_last_sync is not None:
            metrics.update({"tinylora/sync_bytes": float(self.tl_last_sync.bytes),
                            "tinylora/sync_seconds": self.tl_last_sync.seconds})
        return metrics

    def tinylora_metrics(self) -> dict[str, float]:
        """v (each value when there are few), its norm, and the last sync's bytes, seconds and merge fidelity."""
        v = self._v()
        metrics = {"tinylora/v_norm": v.norm().item(), "tinylora/v_abs_max": v.abs().max().item()}
        if v.numel() <= self.tl_options.log_v_max:
            metrics.update({f"tinylora/v_{i}": x for i, x in enumerate(v.tolist())})
        metrics.update(self.sync_metrics())
        if self.tl_last_sync is not None:
            metrics["tinylora/merge_fidelity"] = self.tl_last_sync.fidelity
        return metrics

    # ------------------------------------------------------------------ weight sync
    def get_per_tensor_param(self, layered_summon=False, base_sync_done=False, **kwargs):
        if not self.tinylora_enabled:
            return super().get_per_tensor_param(layered_summon=layered_summon, base_sync_done=base_sync_done, **kwargs)
        if self.tl_options.sync_mode == "lora":
            return self._lora_stream(layered_summon, base_sync_done, **kwargs)
        if self.tl_options.sync_mode == "native":
            return self._native_stream(layered_summon, **kwargs), None
        stream, _ = super().get_per_tensor_param(layered_summon=layered_summon, base_sync_done=base_sync_done, **kwargs)
        stats = MergeStats()
        self.tl_last_sync = stats
        dtype = getattr(torch, self.tl_options.sync_dtype)
        return self._logged(self.tl_adapter.merged_named_tensors(stream, dtype=dtype, stats=stats), stats), None

    def _lora_stream(self, layered_summon, base_sync_done, **kwargs):
        """``sync_mode: lora``. verl's worker asks with ``base_sync_done=True`` (the adapter) and, once, when
        the rollout started from dummy weights, with ``False`` (the pristine base under HF names); a non-None
        peft config is what tells it to send an adapter."""
        dtype = getattr(torch, self.tl_options.sync_dtype)
        peft_config = self.tl_adapter.lora_config()
        if not base_sync_done:
            stream, _ = super().get_per_tensor_param(layered_summon=layered_summon, base_sync_done=False, **kwargs)
            return ((name, t.to(dtype) if t.is_floating_point() else t) for name, t in stream), peft_config
        stats = MergeStats()
        self.tl_last_sync = stats
        return self._logged(self.tl_adapter.lora_named_tensors(dtype, stats=stats), stats), peft_config

    def _native_stream(self, layered_summon, **kwargs):
        """``sync_mode: native``: base + install + v on the first sync of this engine's life (a restarted run
        reinstalls), v and its checksum after that. The install counts as sent only once the stream is consumed."""
        self.tl_adapter.check_finite("native sync")
        stats = MergeStats()
        self.tl_last_sync = stats
        start = time.perf_counter()
        install = not self.tl_native_installed
        dtype = getattr(torch, self.tl_options.sync_dtype)
        parts = []
        if install:
            base, _ = super().get_per_tensor_param(layered_summon=layered_summon, base_sync_done=True, **kwargs)
            parts.append(((n, t.to(dtype) if t.is_floating_point() else t) for n, t in base))
            adapter = self.tl_adapter
            parts.append(native.install_tensors((n, adapter.factors(n)[:4], adapter.group_of(n))
                                                for n in adapter.module_names))
        v = torch.stack([p.detach().float() for p in self.tl_adapter.vectors])  # (groups, u)
        step = native.step_tensors(v)
        parts.append(iter(step))
        sent = 0
        for part in parts:
            for name, tensor in part:
                stats.tensors += 1
                sent += tensor.numel() * tensor.element_size()
                yield name, tensor
        stats.bytes, stats.seconds = sent, time.perf_counter() - start
        self.tl_native_installed = True
        if self.rank == 0:
            step_bytes = sum(t.numel() * t.element_size() for _, t in step)
            logger.warning("[tinylora] native sync: %s%d bytes of v + checksum, %.2fs, v=%s, checksum %d",
                           f"base + install {(sent - step_bytes) / 2**20:.2f} MB (once), " if install else "",
                           step_bytes, stats.seconds, [round(x, 6) for x in v.flatten().tolist()[:64]],
                           int(step[1][1]))

    def _logged(self, stream, stats: MergeStats):
        yield from stream
        if self.rank == 0:
            v = self._v()
            shown = [round(x, 6) for x in v.tolist()] if v.numel() <= self.tl_options.log_v_max else f"|v|={v.norm():.4g}"
            logger.warning(
                "[tinylora] %s sync: %d tensors (%d modules), %.2f MB in %.2fs, fidelity %.4f, v=%s",
                self.tl_options.sync_mode, stats.tensors, stats.merged, stats.bytes / 2**20, stats.seconds,
                stats.fidelity, shown,
            )

    def get_per_tensor_param_shard(self, **kwargs):
        self._refuse_sharded_sync("sharded sync (checkpoint_engine backends other than 'naive') would send unmerged "
                                  "base shards")
        return super().get_per_tensor_param_shard(**kwargs)

    def get_per_tensor_param_delta_shard(self, **kwargs):
        self._refuse_sharded_sync("delta-sharded sync would send unmerged base deltas")
        return super().get_per_tensor_param_delta_shard(**kwargs)

    def _refuse_sharded_sync(self, why: str) -> None:
        """checkpoint_engine backends other than 'naive' bypass :meth:`get_per_tensor_param`, where TinyLoRA merges."""
        if self.tinylora_enabled:
            raise NotImplementedError(f"TinyLoRA sync needs the merged per-tensor stream; {why}. Use "
                                      "actor_rollout_ref.rollout.checkpoint_engine.backend=naive")

    def disable_adapter(self):
        if self.tinylora_enabled:
            return self.tl_adapter.disable_adapter()
        return super().disable_adapter()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, local_path: str, hdfs_path=None, global_step: int = 0, max_ckpt_to_keep=None, **kwargs):
        """Write the few-byte adapter file (rank 0) and per-rank optimizer/scheduler/RNG state; no frozen shards.

        ``max_ckpt_to_keep`` (verl passes ``trainer.max_actor_ckpt_to_keep``) removes the oldest actor checkpoints
        beyond that many once this one is written, as verl's own checkpoint manager does; checkpoints of earlier
        runs in the same folder count too.
        """
        if not self.tinylora_enabled:
            return super().save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep, **kwargs)
        os.makedirs(local_path, exist_ok=True)
        if self.rank == 0:
            save_adapter(self.tl_adapter, os.path.join(local_path, ADAPTER_FILE))
        state = {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "rng": rng_state(),
            "global_step": global_step,
        }
        torch.save(state, os.path.join(local_path, STATE_FILE.format(rank=self.rank)))
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            for old in checkpoints_beyond(local_path, max_ckpt_to_keep):
                logger.warning("[tinylora] max_ckpt_to_keep=%s: removing %s", max_ckpt_to_keep, old)
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, local_path: str, hdfs_path=None, del_local_after_load: int = True, **kwargs):
        """Restore v bit-exactly from the adapter file, then the optimizer, scheduler and RNG state."""
        if not self.tinylora_enabled:
            return super().load_checkpoint(local_path, hdfs_path, del_local_after_load, **kwargs)
        load_adapter_state(self.tl_adapter, os.path.join(local_path, ADAPTER_FILE), check_fingerprint=self.rank == 0)
        state = torch.load(os.path.join(local_path, STATE_FILE.format(rank=self.rank)), weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        set_rng_state(state.get("rng", {"cpu": state.get("cpu_rng")}))
        if dist.is_initialized():
            dist.barrier()
