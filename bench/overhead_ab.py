"""Adapter overhead of TinyLoRA alone: one adapted model, adapter on vs off on the same weights, in ABBA pairs.

The round-robin section (:mod:`bench.overhead`) keeps ~16 models side by side for the comparison with peft, so
each on/off pair follows other models' steps: its first call runs on caches the others filled, and the per-round
ratio spreads by ±15% on this 2-core VM, wide for a goal 5% above the base. Here one model runs alone, as a
training loop runs it, step after step. A pair is four calls, on-off-off-on or off-on-on-off (alternating), so a
drift that is linear across the pair cancels; its ratio is the mean of its two on calls over the mean of its two
off calls, and the section reports the median over pairs with a seeded 95% bootstrap interval.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .common import Section, bootstrap_ci, log, median, timed_call
from .overhead import _gate, _loss


def abba_pairs(on: Callable[[], None], off: Callable[[], None], pairs: int, warmup: int,
               after: Optional[Callable[[], None]] = None) -> dict[str, list[float]]:
    """Per pair, the mean wall and process CPU seconds of the two ``on`` and the two ``off`` calls:
    ``{"on", "off", "on_cpu", "off_cpu"}``, each ``pairs`` long; ``warmup`` untimed on/off calls come first."""
    if pairs < 1 or warmup < 0:
        raise ValueError(f"abba_pairs: pairs must be >= 1 and warmup >= 0, got pairs={pairs}, warmup={warmup}")
    fns = {True: on, False: off}

    def call(which: bool) -> tuple[float, float]:
        return timed_call(fns[which], after)

    for _ in range(warmup):
        call(True)
        call(False)
    out: dict[str, list[float]] = {"on": [], "off": [], "on_cpu": [], "off_cpu": []}
    for i in range(pairs):
        got: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for which in ((True, False, False, True) if i % 2 == 0 else (False, True, True, False)):
            got[which].append(call(which))
        for which, key in ((True, "on"), (False, "off")):
            out[key].append(sum(t for t, _ in got[which]) / 2)
            out[key + "_cpu"].append(sum(c for _, c in got[which]) / 2)
    return out


def run(factory: Callable[[torch.dtype], nn.Module], dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
        batches: Sequence[int] = (1,), seq_len: int = 256, pairs: int = 24, warmup: int = 2, budget: int = 13,
        goal: float = 1.05, seed: int = 0, progress: Optional[Callable[[str], None]] = log) -> Section:
    """Time forward+backward (``labels = input_ids`` loss) of TinyLoRA on and off for each dtype and batch size."""
    from tinylora_verl import TinyLoRAConfig, inject_tinylora

    start = time.perf_counter()
    progress = progress or (lambda s: None)
    rows, summary = [], {"goal": goal, "pairs": pairs, "cases": []}
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        model = factory(dtype)
        adapter = inject_tinylora(model, TinyLoRAConfig(budget=budget))
        params = list(adapter.vectors) + [_gate(model)]
        model.eval()
        for batch in batches:
            ids = torch.randint(0, model.config.vocab_size, (batch, seq_len),
                                generator=torch.Generator().manual_seed(seed + batch))

            def on():
                _loss(model, ids).backward()

            def off():
                with adapter.disable_adapter():
                    _loss(model, ids).backward()

            def drop_grads():
                for p in params:
                    p.grad = None

            progress(f"overhead-ab: {dname} batch {batch} x seq {seq_len}: {pairs} ABBA pairs after {warmup} warmup")
            t = abba_pairs(on, off, pairs, warmup, after=drop_grads)
            ratios = [a / b for a, b in zip(t["on"], t["off"])]
            cpu = [a / b for a, b in zip(t["on_cpu"], t["off_cpu"])]
            lo, hi = bootstrap_ci(ratios, seed=seed)
            med = median(ratios)
            case = {"dtype": dname, "batch": batch, "seq_len": seq_len, "ratio": med, "ci": [lo, hi],
                    "min_ratio": min(t["on"]) / min(t["off"]), "cpu_ratio": median(cpu),
                    "on_s": median(t["on"]), "off_s": median(t["off"]), "spread": [min(ratios), max(ratios)],
                    "meets_goal": med <= goal, "meets_goal_ci": hi <= goal}
            summary["cases"].append(case)
            rows.append([dname, f"{batch}x{seq_len}", pairs, case["on_s"], case["off_s"],
                         f"{med:.3f} [{lo:.3f}–{hi:.3f}]", f"{min(ratios):.3f}–{max(ratios):.3f}",
                         case["min_ratio"], case["cpu_ratio"], case["meets_goal"], case["meets_goal_ci"]])
            progress(f"overhead-ab: {dname} b{batch}: TinyLoRA {med:.3f}x [95% CI {lo:.3f}–{hi:.3f}] its weights "
                     f"with the adapter off")
        del model, adapter, params
    notes = [
        f"one SmolLM2 copy with `inject_tinylora(model, TinyLoRAConfig(budget={budget}))` and the base section's "
        "embeddings gate, timed alone; on = the adapter, off = the same weights under `disable_adapter()`.",
        "a pair = four calls on-off-off-on or off-on-on-off, alternating by pair; its ratio = mean of its two on "
        "calls / mean of its two off calls. ratio = median over pairs [95% bootstrap interval of the median]; "
        "spread = min–max over pairs; min ratio = fastest on call / fastest off call; CPU ratio = the same median "
        "in process CPU time.",
        f"goal: ≤ {goal}× (met: the median; interval within: the interval's upper end too).",
    ]
    cols = ["dtype", "batch×seq", "pairs", "on s (median)", "off s (median)", "ratio [95% CI]", "spread",
            "min ratio", "CPU ratio", "goal met", "interval within goal"]
    return Section("overhead-ab", "Adapter overhead, TinyLoRA alone (ABBA pairs)", cols, rows, notes, summary,
                   time.perf_counter() - start)
