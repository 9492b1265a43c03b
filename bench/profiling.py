"""Where the adapter's overhead goes: torch.profiler of one forward+backward, base vs TinyLoRA, op by op.

Both variants run the same input under ``torch.profiler``; per ATen op the call counts and self CPU times are
aggregated and differenced (adapter − base). Call counts are deterministic; times are as noisy as the machine.
The plain-autograd hook of :mod:`bench.autograd_hook` (the package's hook before ``ops.py``) is profiled the same
way when asked, to show what the hand-written backward removes.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from .common import Section, log
from .overhead import AUTOGRAD, BASE, OURS, _loss, build_variants


def op_table(model: nn.Module, ids: torch.Tensor, rounds: int = 2) -> dict[str, tuple[int, float]]:
    """``{op: (calls per step, self CPU ms per step)}`` for ``rounds`` profiled forward+backward steps."""
    _loss(model, ids).backward()  # warm-up outside the profiler
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            _loss(model, ids).backward()
    out = {}
    for e in prof.key_averages():
        out[e.key] = (e.count // rounds, e.self_cpu_time_total / 1000.0 / rounds)
    return out


def run(factory: Callable[[torch.dtype], nn.Module], dtype: torch.dtype = torch.float32, batch: int = 1,
        seq_len: int = 256, budget: int = 13, rounds: int = 2, top: int = 15, before: bool = True,
        seed: int = 0, progress: Optional[Callable[[str], None]] = log) -> Section:
    start = time.perf_counter()
    progress = progress or (lambda s: None)
    dname = str(dtype).replace("torch.", "")
    progress(f"profile: building base/ours{'/before' if before else ''} in {dname}")
    variants = build_variants(factory, dtype, budget, before=before)
    vocab = variants[BASE][0].config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    names = [BASE, OURS] + ([AUTOGRAD] if before else [])
    tables = {}
    for k in names:
        progress(f"profile: {k}")
        tables[k] = op_table(variants[k][0], ids, rounds)
    base, ours = tables[BASE], tables[OURS]
    prop = tables.get(AUTOGRAD, {})
    ops = set(base) | set(ours) | set(prop)

    def get(t, op):
        return t.get(op, (0, 0.0))

    diffs = sorted(ops, key=lambda op: get(ours, op)[1] - get(base, op)[1], reverse=True)
    rows = []
    for op in diffs[:top]:
        row = [f"`{op}`", get(base, op)[0], get(ours, op)[0], get(base, op)[1], get(ours, op)[1],
               get(ours, op)[1] - get(base, op)[1]]
        if before:
            row += [get(prop, op)[0], get(prop, op)[1] - get(base, op)[1]]
        rows.append(row)
    total = {k: sum(ms for _, ms in t.values()) for k, t in tables.items()}
    calls = {k: sum(c for c, _ in t.values()) for k, t in tables.items()}
    summary = {"dtype": dname, "self_cpu_ms": total, "op_calls": calls,
               "n_modules": sum(1 for m in variants[OURS][0].modules() if hasattr(m, "tinylora_U"))}
    n = summary["n_modules"]
    notes = [
        f"{dname}, batch {batch} x seq {seq_len}, mean of {rounds} profiled steps; self CPU ms summed over all ops: "
        + ", ".join(f"{k}: {total[k]:.1f} ms in {calls[k]} op calls" for k in names) + ".",
        f"TinyLoRA adds {calls[OURS] - calls[BASE]} op calls per step over {n} adapted modules "
        f"(≈{(calls[OURS] - calls[BASE]) / max(n, 1):.1f} per module, forward and backward)"
        + (f"; the plain-autograd hook (before) added {calls[AUTOGRAD] - calls[BASE]} "
           f"(≈{(calls[AUTOGRAD] - calls[BASE]) / max(n, 1):.1f} per module)." if before else "."),
        "rows: the ops whose self time grows most from base to ours (Δ = ours − base, per step).",
    ]
    cols = ["op", "calls base", "calls ours", "ms base", "ms ours", "Δms ours"]
    if before:
        cols += ["calls before", "Δms before"]
    del variants
    return Section("profile", f"Profile of the TinyLoRA hook ({dname})", cols, rows, notes, summary,
                   time.perf_counter() - start)
