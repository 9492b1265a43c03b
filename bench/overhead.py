"""Adapter overhead: forward+backward time of a causal LM with each adapter, as ratios to the frozen base.

The baseline ("base") is the frozen model with one trainable scalar gate multiplying the input embeddings'
output. Its backward therefore runs through every layer w.r.t. activations only, with no weight gradients: the
same backward any adapter whose first trainable parameter sits in layer 0 must run, and the floor any adapter
is measured against. (A "full FT" row, with every weight trainable, is given for scale when requested.)

Every variant is its own copy of the model, built by ``factory(dtype)``; variants are timed round-robin so a
change in machine load hits all of them alike. Memory is measured as the bytes of activations autograd saves
for backward (storages of parameters and buffers excluded, each storage counted once): exact, deterministic
and cheap, unlike RSS deltas, which glibc's allocator caching makes meaningless when several models share a
process.
"""

from __future__ import annotations

import gc
import itertools
import time
from typing import Callable, ContextManager, NamedTuple, Optional, Sequence

import torch
from torch import nn

from .common import Section, bootstrap_ci, interleaved_times, log, median, paired_ratios

BASE, CONTROL, OURS, PEFT_TINY, PEFT_LORA, FULL_FT, AUTOGRAD, HOOK, OURS_ACT, NO_KERNEL, PER_MODULE = (
    "base (frozen, grad to inputs)", "base, second copy (noise control)", "TinyLoRA (ours)", "peft TinyLoRA",
    "peft LoRA r=1", "full FT", "TinyLoRA, plain-autograd hook (before)", "TinyLoRA, hook path (before)",
    "TinyLoRA (ours, hook_dtype=activation)", "TinyLoRA, torch ops only (before: cpu_kernel=off)",
    "TinyLoRA, a node per module (before: group_nodes=False)",
)
OFF = " [adapter off]"


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _gate(model: nn.Module) -> nn.Parameter:
    """One trainable scalar multiplying the input embeddings: the backward then runs through every layer."""
    gate = nn.Parameter(torch.ones((), dtype=torch.float32))
    model.get_input_embeddings().register_forward_hook(lambda mod, args, y: y * gate)
    return gate


class Variant(NamedTuple):
    """One timed model: ``params`` are what each round's gradients are dropped for (the adapter's and the gate),
    ``trainable`` the adapter's own scalars, ``off`` a context turning the adapter off on these very weights."""

    model: nn.Module
    params: list[nn.Parameter]
    trainable: int
    off: Optional[Callable[[], ContextManager]] = None


def build_variants(factory: Callable[[torch.dtype], nn.Module], dtype: torch.dtype, budget: int,
                   full_ft: bool = False, before: bool = False) -> dict[str, Variant]:
    """``{name: Variant}``, each on a fresh copy of the model from ``factory``; every adapted copy carries the
    base's embeddings gate too, so with its adapter off it runs exactly the base's backward."""
    from peft import LoraConfig, TinyLoraConfig, get_peft_model

    from tinylora_verl import TinyLoRAConfig, find_target_modules, inject_tinylora
    from tinylora_verl.core.config import DEFAULT_TARGET_MODULES

    targets = list(DEFAULT_TARGET_MODULES)
    out: dict[str, Variant] = {}

    for name in (BASE, CONTROL):
        m = factory(dtype)
        _freeze(m)
        out[name] = Variant(m, [_gate(m)], 1)

    def ours(name, reroute=None, install=None, **config):
        m = factory(dtype)
        adapter = inject_tinylora(m, TinyLoRAConfig(budget=budget, **config))
        if reroute is not None:
            from .variants import reroute as install_routing

            install_routing(adapter, **reroute)
        if install is not None:
            install(adapter)
        out[name] = Variant(m, list(adapter.vectors) + [_gate(m)], adapter.num_trainable, adapter.disable_adapter)
        return m

    n_targets = len(find_target_modules(ours(OURS), tuple(targets)))
    if before:
        from .autograd_hook import install

        ours(AUTOGRAD, install=install)
        ours(HOOK, reroute={"fused": False}, cpu_kernel="off")
        ours(NO_KERNEL, cpu_kernel="off")
        ours(PER_MODULE, reroute={"group_nodes": False})
    if dtype != torch.float32:
        # The package's fix for low-precision models (the prototype's low_precision path, now a config option).
        ours(OURS_ACT, hook_dtype="activation")

    def peft(name, cfg):
        pm = get_peft_model(factory(dtype), cfg)
        params = [p for p in pm.parameters() if p.requires_grad]
        out[name] = Variant(pm, params + [_gate(pm)], sum(p.numel() for p in params), pm.disable_adapter)

    # peft: num_groups = round(n * (1 - weight_tying)); u = 1 and n - budget tied away gives `budget` scalars.
    peft(PEFT_TINY, TinyLoraConfig(r=2, u=1, weight_tying=1.0 - budget / n_targets, target_modules=targets))
    peft(PEFT_LORA, LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=targets))

    if full_ft:
        m = factory(dtype)
        for p in m.parameters():
            p.requires_grad_(True)
        params = list(m.parameters())
        out[FULL_FT] = Variant(m, params, sum(p.numel() for p in params))
    for v in out.values():
        v.model.eval()  # no dropout; autograd is unaffected
    return out


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def saved_activation_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one forward (parameter/buffer storages excluded, each storage once)."""
    exclude = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, ids)
    loss.backward()
    return sum(seen.values())


def run(factory: Callable[[torch.dtype], nn.Module], dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
        batches: Sequence[int] = (1,), seq_len: int = 256, repeats: int = 5, warmup: int = 1, budget: int = 13,
        full_ft: bool = False, before: bool = False, goal: float = 1.05, seed: int = 0,
        progress: Optional[Callable[[str], None]] = log) -> Section:
    """Time forward+backward (``labels = input_ids`` loss) of every variant for each dtype and batch size."""
    start = time.perf_counter()
    progress = progress or (lambda s: None)
    rows, summary = [], {"goal": goal, "cases": []}
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        progress(f"overhead: building variants in {dname}")
        variants = build_variants(factory, dtype, budget, full_ft=full_ft, before=before)
        vocab = variants[BASE].model.config.vocab_size
        for batch in batches:
            gen = torch.Generator().manual_seed(seed + batch)
            ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)

            def make(v: Variant, off: bool = False):
                if off:
                    def step():
                        with v.off():
                            _loss(v.model, ids).backward()
                    return step
                return lambda: _loss(v.model, ids).backward()

            fns = {k: make(v) for k, v in variants.items()}
            fns.update({k + OFF: make(v, off=True) for k, v in variants.items() if v.off is not None})

            def drop_grads(name):
                for p in variants[name.removesuffix(OFF)].params:
                    p.grad = None

            progress(f"overhead: {dname} batch {batch} x seq {seq_len}: {repeats} rounds after {warmup} warmup")
            cpu: dict[str, list[float]] = {}
            # Each adapter's on and off calls run side by side: the judged self ratio compares calls a step apart.
            adjacent = {k: k + OFF for k, v in variants.items() if v.off is not None}
            times = interleaved_times(fns, repeats, warmup, after=drop_grads, progress=lambda s: progress("  " + s),
                                      cpu=cpu, adjacent=adjacent)
            paired_cpu = paired_ratios(cpu, BASE)
            mem = {}
            for k, v in variants.items():
                mem[k] = saved_activation_bytes(v.model, ids)
                drop_grads(k)
            paired = paired_ratios(times, BASE)
            base_med, base_min = median(times[BASE]), min(times[BASE])
            case = {"dtype": dname, "batch": batch, "seq_len": seq_len, "median_s": {}, "ratio": {},
                    "paired_ratio": {}, "self_ratio": {}, "self_ratio_ci": {}, "off_vs_base": {}, "min_ratio": {},
                    "saved_bytes": mem, "trainable": {}}
            for k, v in variants.items():
                med = median(times[k])
                pr, self_cell = paired[k], None
                if v.off is not None:
                    per_round = [a / b for a, b in zip(times[k], times[k + OFF])]
                    (lo, hi), self_med = bootstrap_ci(per_round, seed=seed), median(per_round)
                    self_cell = f"{self_med:.3f} [{lo:.3f}–{hi:.3f}] ({min(per_round):.3f}–{max(per_round):.3f})"
                    case["self_ratio"][k], case["off_vs_base"][k] = self_med, paired[k + OFF][0]
                    case["self_ratio_ci"][k] = [lo, hi]
                rows.append([dname, f"{batch}x{seq_len}", k, v.trainable, med, med / base_med,
                             f"{pr[0]:.3f} [{pr[1]:.3f}–{pr[2]:.3f}]",
                             self_cell,
                             case["off_vs_base"].get(k), min(times[k]) / base_min, median(cpu[k]),
                             paired_cpu[k][0], mem[k] / 2**20, mem[k] / mem[BASE]])
                case["median_s"][k], case["ratio"][k], case["paired_ratio"][k] = med, med / base_med, pr[0]
                case["min_ratio"][k] = min(times[k]) / base_min
                case.setdefault("cpu_paired_ratio", {})[k] = paired_cpu[k][0]
                case["trainable"][k] = v.trainable
            # Judged on the same weights with the adapter off: identical copies of one model differ by a few percent
            # in speed (where their tensors landed; the second base copy shows it), which a ratio across copies
            # carries and a ratio within one copy does not.
            ours, peft_t = case["self_ratio"][OURS], case["self_ratio"][PEFT_TINY]
            if OURS_ACT in case["self_ratio"]:
                case["ours_activation_dtype"] = case["self_ratio"][OURS_ACT]
                case["ours_activation_meets_goal"] = case["ours_activation_dtype"] <= goal
            case["ours_meets_goal"] = ours <= goal
            case["ours_meets_goal_ci"] = case["self_ratio_ci"][OURS][1] <= goal
            case["ours_meets_goal_across_copies"] = case["paired_ratio"][OURS] <= goal
            case["control"] = {"paired_ratio": paired[CONTROL][0], "min_ratio": case["min_ratio"][CONTROL],
                               "spread": [paired[CONTROL][1], paired[CONTROL][2]]}
            case["ours_below_peft_tinylora"] = ours < peft_t and paired[OURS][0] < paired[PEFT_TINY][0]
            summary["cases"].append(case)
            progress(f"overhead: {dname} b{batch}: ours {ours:.3f}x its adapter off ({case['paired_ratio'][OURS]:.3f}x "
                     f"base copy), peft TinyLoRA {peft_t:.3f}x ({case['paired_ratio'][PEFT_TINY]:.3f}x); noise "
                     f"control {case['control']['paired_ratio']:.3f}x")
        del variants
        gc.collect()
    notes = [
        "base = frozen model whose input embeddings are multiplied by one trainable scalar: its backward runs "
        "through every layer w.r.t. activations but computes no weight gradient, the floor for any adapter. "
        "base, second copy: an identical second base model timed as a variant; its ratios (ideally 1) show "
        "what noise alone does to every statistic of the run.",
        f"TinyLoRA (ours): `inject_tinylora(model, TinyLoRAConfig(budget={budget}))` (r=2, u=1, tiled). "
        f"peft TinyLoRA: `TinyLoraConfig(r=2, u=1, weight_tying=1-{budget}/n_targets)`; "
        "peft LoRA: `LoraConfig(r=1)`; all on the 7 projection types. v = 0 at init does not change the work done.",
        "loss = `model(input_ids, labels=input_ids).loss` (includes the tied LM head and the cross-entropy); "
        "random token ids from a seeded generator; models in eval mode (no dropout).",
        "ratio = median time / median base time; paired = median [min–max] of per-round ratios to the base copy "
        "(variants run round-robin with a rotated order, so each round's ratio compares runs seconds apart); "
        "vs own adapter off = the same per-round ratio against the variant's own weights run with its adapter "
        "switched off (`disable_adapter()`: ours then calls `F.linear` from its installed forward, one Python call "
        "per linear more than the base; peft still goes through its layer wrappers, which flatters its ratio) in "
        "the same round, the two calls side by side (first one, then the other, alternating by round); its cell is "
        "the median [95% bootstrap interval of the median] (min–max); off vs base = that adapter-off run against the "
        "base copy, i.e. how fast this copy of the "
        "weights happens to be; min ratio = fastest round / fastest base round (machine noise only ever adds time).",
        "CPU s / CPU ratio = process CPU time (all threads) and its paired ratio: on a loaded machine it counts "
        "work done rather than time spent descheduled (with >1 thread it also counts OpenMP spin-waits).",
        "TinyLoRA (ours): each linear's forward is one fused node (base linear + update, the update's input "
        "gradient added in place into the base's). hook path (before): the package's previous design, still what "
        "linears with their own forward get (`bench.variants.reroute(adapter, fused=False)`): a forward hook whose hand-written "
        "node updates the output in place and returns its own input gradient for autograd to add. "
        "plain-autograd hook (before): bench/autograd_hook.py, the hook the package had before "
        "tinylora_verl/core/ops.py (same math, one autograd node per op, out-of-place add, x V per module). "
        "torch ops only: the fused node with `cpu_kernel: off`, i.e. without the one-pass C++ kernel "
        "(tinylora_verl/kernels/csrc/rank_r_update.cpp) that adds the rank-2 update into the activations. "
        "a node per module: q/k/v and gate/up as a node each (over one shared x V) instead of one node per group "
        "(`bench.variants.reroute(adapter, group_nodes=False)`). "
        "hook_dtype=activation: the package option that runs the adapter math in the model's dtype (bf16/fp16 "
        "only), the fix for the bf16 overhead.",
        "saved MB = activations autograd keeps for backward (parameters and buffers excluded).",
        f"goal: TinyLoRA ≤ {goal}× base and below peft TinyLoRA, judged on the median ratio to its own weights with "
        "the adapter off (the headline also says whether the upper end of its 95% interval is within the goal): "
        "identical copies of one model run a few percent apart depending on where their tensors "
        "landed (the second base copy's column shows it in this run), which a ratio across copies carries.",
    ]
    cols = ["dtype", "batch×seq", "variant", "trainable", "median s", "ratio vs base", "paired ratio [min–max]",
            "vs own adapter off [95% CI] (min–max)", "off vs base", "min ratio", "CPU s", "CPU ratio", "saved MB",
            "saved ratio"]
    return Section("overhead", "Adapter overhead (forward+backward)", cols, rows, notes, summary,
                   time.perf_counter() - start)
