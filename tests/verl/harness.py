"""Build verl's engine on a tiny saved model, in this process or in spawned gloo ranks (CPU platform on)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def activate_cpu() -> None:
    os.environ["TINYLORA_VERL_CPU"] = "1"
    from tinylora_verl.verl.cpu import platform as cpu_platform

    cpu_platform.activate()


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    from tests.conftest import save_tiny_model as save

    save(path, seed=seed)
    return path


def free_port() -> int:
    """A TCP port nothing listens on now (another test process may hold any fixed one)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process(port: int | None = None) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port or free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)


def build_engine(model_dir: Path, tinylora: dict | None, forward_only: bool = False, lr: float = 1e-2, initialize: bool = True,
                 lora_extra: dict | None = None, attn_implementation: str = "eager", use_remove_padding: bool = False,
                 **model_kw):
    """``EngineRegistry.new`` exactly as verl's TrainingWorker calls it, then ``initialize()``."""
    import tinylora_verl.verl.register  # noqa: F401  (what model.external_lib does in a worker)
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine.base import EngineRegistry

    lora = ({"tinylora": tinylora} if tinylora is not None else {}) | (lora_extra or {})
    mc = HFModelConfig(path=str(model_dir), lora=lora, override_config={"attn_implementation": attn_implementation},
                       use_remove_padding=use_remove_padding, **model_kw)
    # fp32 compute so results compare exactly with a plain float32 reference
    ec = FSDPEngineConfig(strategy="fsdp2", forward_only=forward_only, use_torch_compile=False,
                          model_dtype="fp32", mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"})
    oc = FSDPOptimizerConfig(lr=lr, total_training_steps=10, weight_decay=0.0, clip_grad=1e9)
    engine = EngineRegistry.new("language_model", "fsdp2", model_config=mc, engine_config=ec, optimizer_config=oc,
                                checkpoint_config=CheckpointConfig())
    if initialize:
        engine.initialize()
    return engine


def batch(seed: int = 5, n: int = 4, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def loss_of(module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL: a stand-in loss with a gradient for every v."""
    logits = module(input_ids=ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def gloo_rank_main(rank: int, world: int, model_dir: str, port: int, out: str) -> None:
    """One spawned rank: build the engine over `world` gloo ranks, backprop its half of the batch, step."""
    import torch.distributed as dist

    activate_cpu()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    engine = build_engine(Path(model_dir), {"enable": True, "budget": 7, "init": "normal", "init_std": 0.05})
    ids = batch().chunk(world)[rank]
    engine.optimizer_zero_grad()
    loss_of(engine.module, ids).backward()
    norm = engine.optimizer_step()
    if rank == 0:
        torch.save({"grads": [p.grad.clone() for p in engine.tl_adapter.parameters()], "norm": norm}, out)
    dist.destroy_process_group()


def nested_batch(lengths: list[int], seed: int = 11, vocab: int = 128, **non_tensor):
    """A verl no-padding micro-batch (jagged ``input_ids``/``position_ids``/``loss_mask``) as ``TrainingWorker``
    hands it to ``engine.infer_batch``/``train_batch``, one micro-batch holding every sequence."""
    from verl.utils import tensordict_utils as tu

    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]

    def jagged(rows):
        return torch.nested.as_nested_tensor(rows, layout=torch.jagged)

    tensors = {"input_ids": jagged(ids), "position_ids": jagged([torch.arange(n) for n in lengths]),
               "loss_mask": jagged([torch.ones(n, dtype=torch.int64) for n in lengths]),
               "temperature": torch.ones(len(lengths))}
    settings = dict(use_dynamic_bsz=False, micro_batch_size_per_gpu=len(lengths), use_fused_kernels=False,
                    calculate_entropy=False, global_token_num=list(lengths)) | non_tensor
    return tu.get_tensordict(tensor_dict=tensors, non_tensor_dict=settings)


def log_probs(engine, lengths: list[int], remove_padding: bool, seed: int = 11) -> list[torch.Tensor]:
    """Per-sequence token log-probs from ``engine.infer_batch`` with or without packing the micro-batch."""
    out = engine.infer_batch(nested_batch(lengths, seed, use_remove_padding=remove_padding), loss_function=None)
    lp = out["model_output"]["log_probs"]
    return list(lp.unbind()) if lp.is_nested else [row[:n] for row, n in zip(lp, lengths)]
