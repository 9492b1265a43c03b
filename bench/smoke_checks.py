"""The checks behind ``bench.gpu_smoke``: each builds its own reference and raises AssertionError naming the gap.

Device-generic: ``device`` is ``"cuda"`` (one GPU, NCCL) or ``"cpu"`` (tinylora_verl's CPU platform, gloo).
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import time
import types
from functools import partial
from pathlib import Path

import torch

from .common import bootstrap_ci, median

# Log-probs of the same tokens from the packed and the padded forward: the same arithmetic in another layout and
# order, so in bf16 they differ by the rounding of bf16 logits (an ulp of a logit of magnitude 4 is 2^-6), in float32
# by float32 round-off. As a control the same tokens run as one unbroken sequence, each attending to the previous
# sequences: that must differ by more than twice as much, or the comparison could not tell packing from mixing.
PACKING_ATOL = {torch.bfloat16: 0.1, torch.float32: 1e-3}
# v's gradient from the fused node (float32 inputs, float32 accumulation over tokens x out) against float64 autograd.
GRAD_RTOL = 1e-3
BUDGET = 7  # 14 targets in two decoder layers: u = 1, 2 modules per tiled group


class _Anything(types.ModuleType):
    """A module whose every attribute is another such module, callable, usable as a decorator or base class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        child = _Anything(f"{self.__name__}.{name}")
        setattr(self, name, child)
        return child

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and not kwargs and callable(args[0]) else self

    def __mro_entries__(self, bases):
        return (object,)


class _RayStubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "ray" or fullname.startswith("ray."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Anything(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install_ray_stub(force: bool = False) -> bool:
    """Serve ``import ray`` (verl does it at import time) with a stand-in when Ray is absent or ``force``."""
    if "ray" in sys.modules or (not force and importlib.util.find_spec("ray") is not None):
        return False
    sys.meta_path.insert(0, _RayStubFinder())
    return True


def init_process_group(device: str) -> None:
    """One rank, as verl's worker would open it (the CPU platform first on the CPU)."""
    import torch.distributed as dist

    if device == "cpu":
        os.environ["TINYLORA_VERL_CPU"] = "1"
        from tinylora_verl.verl.cpu import platform as cpu_platform

        cpu_platform.activate()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as sock:  # a free port: another process may hold any fixed one
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    if device == "cuda":
        torch.cuda.set_device(0)


def save_random_qwen2(path: Path, shape: dict, seed: int, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A two-layer Qwen2 in ``dtype`` with weights drawn from an explicit generator, and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(num_hidden_layers=2, max_position_embeddings=32768, tie_word_embeddings=False,
                         rope_theta=1e6, **shape)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02))
    model.save_pretrained(str(path))
    vocab = {f"w{i}": i for i in range(shape["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1", pad_token="w2").save_pretrained(str(path))
    return path


def attention_for(device: str) -> str:
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_engine(model_dir: Path, device: str, dtype: torch.dtype = torch.bfloat16):
    """``EngineRegistry.new`` as verl's TrainingWorker calls it, then ``initialize()``, computing in ``dtype``;
    returns ``(engine, attention implementation, injection seconds)``."""
    import tinylora_verl.verl.register  # noqa: F401  (what model.external_lib does in a worker)
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine.base import EngineRegistry

    attn = attention_for(device)
    mc = HFModelConfig(path=str(model_dir), lora={"tinylora": {"enable": True, "budget": BUDGET}},
                       override_config={"attn_implementation": attn}, use_remove_padding=True,
                       enable_gradient_checkpointing=True)
    name = str(dtype).removeprefix("torch.")
    ec = FSDPEngineConfig(strategy="fsdp2", model_dtype=name, use_torch_compile=False,
                          mixed_precision={"param_dtype": name, "reduce_dtype": "fp32", "buffer_dtype": "fp32"})
    oc = FSDPOptimizerConfig(lr=1e-2, total_training_steps=10, weight_decay=0.0, clip_grad=1.0)
    engine = EngineRegistry.new("language_model", "fsdp2", model_config=mc, engine_config=ec, optimizer_config=oc,
                                checkpoint_config=CheckpointConfig())
    engine.initialize()
    from tinylora_verl.verl.engine import TinyLoRAFSDPEngine

    assert type(engine) is TinyLoRAFSDPEngine, f"verl built {type(engine).__qualname__}, not TinyLoRAFSDPEngine"
    return engine, attn, engine.tl_inject_seconds


@dataclasses.dataclass
class ShapeReport:
    name: str
    attention: str
    dtype: str
    tokens: int
    inject_s: float
    fused_err: float = 0.0
    base_err: float = 0.0
    grad_rel: float = 0.0
    packing_diff: float = 0.0
    mixing_diff: float = 0.0
    stream_tensors: int = 0
    step_s: float = 0.0
    peak_gb: float = 0.0
    v_moved: float = 0.0
    overhead: float = 0.0
    overhead_ci: tuple = (0.0, 0.0)
    seconds: float = 0.0
    checks: list = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_v(engine, device: str) -> None:
    from torch.distributed.tensor import DTensor

    for p in engine.tl_adapter.parameters():
        assert p.dtype == torch.float32, f"v is {p.dtype}, not float32"
        assert p.device.type == device, f"v is on {p.device}, not {device}"
        assert not isinstance(p, DTensor) and not isinstance(p.data, DTensor), "v became an FSDP DTensor"


def _module_copy(engine, name: str):
    """A target module's full bf16 weight, bias, factors and v, outside FSDP (its weight is a sharded DTensor)."""
    from torch.distributed.tensor import DTensor

    m = dict(engine.tl_adapter.named_adapted_modules())[name]

    def full(t):
        return None if t is None else (t.full_tensor() if isinstance(t, DTensor) else t).detach()

    return full(m.weight), full(m.bias), engine.tl_adapter.factors(name), engine.tl_adapter.vector_of(name)


def check_fused_op(engine, device: str, dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """The fused linear under ``dtype`` autocast vs float64 ``x (W + ΔW)ᵀ + b``, for the first q_proj (bias) and
    down_proj: no further from it than the base linear in ``dtype`` is from its own float64 value, twice over, plus
    half an ulp of ``dtype`` at the largest output (the update adds one rounding of the output)."""
    from tinylora_verl.core.ops import factor_layouts, tinylora_linear

    worst = (0.0, 0.0)
    gen = torch.Generator().manual_seed(1)
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    names = [n for n in engine.tl_adapter.module_names if n.endswith(("q_proj", "down_proj"))][:2]
    for name in names:
        W, b, (U, S, V, P), _ = _module_copy(engine, name)
        v = torch.full((P.shape[0],), 0.5, device=U.device)  # a ΔW well above the rounding of W
        x = torch.randn(64, W.shape[1], generator=gen).to(device)  # (tokens, in) float32; autocast casts it
        with torch.no_grad(), autocast:
            y = tinylora_linear(x, W, b, v, factor_layouts(U, S, V, P, torch.float32))  # (tokens, out)
            base = torch.nn.functional.linear(x, W, b)
        M = (v.double()[:, None, None] * P.double()).sum(0)  # (r, r)
        dW = (U.double() * S.double()) @ M @ V.double().T  # (out, in)
        xb = x.to(dtype).double()  # what autocast hands the linear
        b64 = 0 if b is None else b.double()
        ref = xb @ (W.double() + dW).T + b64
        base_ref = xb @ W.double().T + b64
        err = (y.double() - ref).abs().max().item()
        base_err = (base.double() - base_ref).abs().max().item()
        bound = 2 * base_err + ref.abs().max().item() * torch.finfo(dtype).eps / 2
        assert y.dtype == dtype and err <= bound, f"{name}: fused op off by {err:.3g} > {bound:.3g}"
        worst = max(worst, (err, base_err))
    return worst


def check_v_gradient(engine, device: str) -> float:
    """``∂L/∂v`` of the fused node (float32 inputs) against autograd through the dense ΔW(v) in float64."""
    from tinylora_verl.core.ops import factor_layouts, tinylora_linear

    worst = 0.0
    gen = torch.Generator().manual_seed(2)
    for name in [n for n in engine.tl_adapter.module_names if n.endswith(("k_proj", "up_proj"))][:2]:
        W, b, (U, S, V, P), _ = _module_copy(engine, name)
        W, b = W.float(), None if b is None else b.float()
        v = torch.randn(P.shape[0], generator=gen).to(device).requires_grad_()  # (u,)
        x = torch.randn(48, W.shape[1], generator=gen).to(device)  # (tokens, in)
        g = torch.randn(48, W.shape[0], generator=gen).to(device)  # (tokens, out)
        (tinylora_linear(x, W, b, v, factor_layouts(U, S, V, P, torch.float32)) * g).sum().backward()
        v64 = v.detach().double().requires_grad_()
        dW = (U.double() * S.double()) @ (v64[:, None, None] * P.double()).sum(0) @ V.double().T  # (out, in)
        (((x.double() @ (W.double() + dW).T) + (0 if b is None else b.double())) * g.double()).sum().backward()
        rel = ((v.grad.double() - v64.grad).norm() / v64.grad.norm()).item()
        assert rel <= GRAD_RTOL, f"{name}: dL/dv off by rel {rel:.3g} > {GRAD_RTOL}"
        worst = max(worst, rel)
    return worst


def _lengths(tokens: int, seed: int) -> list[int]:
    """Sequence lengths summing to ``tokens``, between tokens/16 and tokens/4."""
    gen = torch.Generator().manual_seed(seed)
    out, left = [], tokens
    while left > 0:
        n = min(left, int(torch.randint(max(4, tokens // 16), max(5, tokens // 4), (1,), generator=gen)))
        out.append(n)
        left -= n
    return out


def _batch(lengths: list[int], vocab: int, device: str, seed: int, **settings):
    from verl.utils import tensordict_utils as tu

    gen = torch.Generator().manual_seed(seed)

    def jagged(rows):
        return torch.nested.as_nested_tensor([r.to(device) for r in rows], layout=torch.jagged)

    tensors = {"input_ids": jagged([torch.randint(3, vocab, (n,), generator=gen) for n in lengths]),
               "position_ids": jagged([torch.arange(n) for n in lengths]),
               "loss_mask": jagged([torch.ones(n, dtype=torch.int64) for n in lengths]),
               "temperature": torch.ones(len(lengths), device=device)}
    non_tensor = dict(use_dynamic_bsz=False, micro_batch_size_per_gpu=len(lengths), use_fused_kernels=False,
                      calculate_entropy=False, global_token_num=list(lengths)) | settings
    return tu.get_tensordict(tensor_dict=tensors, non_tensor_dict=non_tensor)


def _log_probs(engine, lengths: list[int], packed: bool, device: str, seed: int = 4) -> torch.Tensor:
    """verl's ``infer_batch`` log-probs of the sequences, concatenated (tokens,) in float32."""
    lp = engine.infer_batch(_batch(lengths, engine.module.config.vocab_size, device, seed, use_remove_padding=packed),
                            loss_function=None)["model_output"]["log_probs"]
    rows = list(lp.unbind()) if lp.is_nested else [row[:n] for row, n in zip(lp, lengths)]
    return torch.cat([r.float() for r in rows])


def check_packing(engine, tokens: int, dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """Packed (remove-padding) and padded log-probs of the same sequences through verl's ``infer_batch``; returns
    ``(packed vs padded, mixed vs padded)``, the latter from the same tokens as one unbroken sequence."""
    lengths = _lengths(min(tokens, 2048), seed=3)
    device = engine.tl_adapter.vectors[0].device.type
    with engine.eval_mode():
        packed = _log_probs(engine, lengths, True, device)
        padded = _log_probs(engine, lengths, False, device)
        mixed = _log_probs(engine, [sum(lengths)], True, device)
    first = lengths[0]
    # Each sequence's last token has no next token: verl's roll makes its log-prob meaningless; compare the others.
    keep = torch.ones(sum(lengths), dtype=torch.bool)
    keep[torch.tensor(lengths).cumsum(0) - 1] = False
    diff = (packed - padded)[keep].abs().max().item()
    mix = (mixed - padded)[keep][first:].abs().max().item()
    atol = PACKING_ATOL[dtype]
    assert diff <= atol, f"packed and padded log-probs differ by {diff:.3g} > {atol}"
    assert mix > 2 * diff, f"the control (sequences attending to each other) differs by only {mix:.3g} vs {diff:.3g}"
    return diff, mix


def check_merged_stream(engine, model_dir: Path, device: str) -> int:
    """Every HF name once, contiguous bf16 on the device; target weights ``cast(W + ΔW)`` from the saved base."""
    from safetensors.torch import load_file

    base = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        base.update(load_file(str(f)))
    stream, peft_config = engine.get_per_tensor_param()
    got = list(stream)
    assert peft_config is None, "merged sync must not send a peft config"
    names = [n for n, _ in got]
    assert sorted(names) == sorted(base) and len(set(names)) == len(names), "stream names differ from the HF names"
    targets = engine.tl_adapter.weight_names()
    for name, t in got:
        assert t.dtype == torch.bfloat16 and t.is_contiguous() and t.device.type == device, (name, t.dtype, t.device)
        if name in targets:
            delta = engine.tl_adapter.delta_weight(targets[name]).cpu()  # (out, in) float32
            want = (base[name].float() + delta).to(torch.bfloat16)
            assert torch.equal(t.cpu(), want), f"{name}: the stream is not cast(W + ΔW)"
    return len(got)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(engine, tokens: int, device: str) -> tuple[float, float, float]:
    """One optimizer step on a packed batch through verl's ``train_batch`` with verl's SFT loss; returns
    ``(seconds, peak GB, |Δv|)``."""
    import resource

    from verl.workers.utils.losses import sft_loss

    before = torch.cat([p.detach().reshape(-1).clone() for p in engine.tl_adapter.parameters()])
    data = _batch(_lengths(tokens, seed=5), engine.module.config.vocab_size, device, 6, use_remove_padding=True,
                  update_lr_scheduler=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    with engine.train_mode():
        engine.train_batch(data, loss_function=partial(sft_loss, None))
    _sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    after = torch.cat([p.detach().reshape(-1) for p in engine.tl_adapter.parameters()])
    assert torch.isfinite(after).all(), f"v is not finite after a step: {after.tolist()}"
    moved = (after - before).abs().max().item()
    assert moved > 0, "one train step left v unchanged"
    return seconds, peak, moved


def overhead_ratio(engine, tokens: int, device: str, pairs: int = 0) -> tuple[float, tuple[float, float]]:
    """Forward+backward of the whole model on one packed row of ``tokens`` with the adapter on, over the same with it
    off (the frozen base), in on-off-off-on pairs: the median self ratio and a seeded 95% bootstrap interval."""
    pairs = pairs or (10 if device == "cuda" else 1)
    gen = torch.Generator().manual_seed(7)
    lengths = _lengths(tokens, seed=8)
    ids = torch.randint(3, engine.module.config.vocab_size, (1, tokens), generator=gen).to(device)
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(device)

    def once(enabled: bool) -> float:
        _sync(device)
        start = time.perf_counter()
        ctx = torch.enable_grad() if enabled else engine.tl_adapter.disable_adapter()
        with ctx:
            out = engine.module(input_ids=ids, position_ids=pos, use_cache=False)
            out.logits.float().mean().backward()
        _sync(device)
        return time.perf_counter() - start

    with engine.train_mode():
        once(True), once(False)  # warm-up
        ratios = []
        for k in range(pairs):
            order = (True, False, False, True) if k % 2 == 0 else (False, True, True, False)
            t = {True: 0.0, False: 0.0}
            for enabled in order:
                t[enabled] += once(enabled)
            ratios.append(t[True] / t[False])
        engine.optimizer_zero_grad()
    return median(ratios), bootstrap_ci(ratios, seed=0)
