"""Merge fidelity: how much of ΔW survives ``cast(W + ΔW)`` in bf16, fp16 and fp32, as a function of |v|.

For each value ``a`` of |v| and each pattern (every vᵢ = +a, or vᵢ = ±a with seeded random signs), the adapter's
vectors are set and :meth:`TinyLoRAAdapter.merge_fidelity` is called per dtype:
``fidelity = ‖cast(W+ΔW) − cast(W)‖ / ‖ΔW‖`` over all merged weights, ``rel_error = ‖delivered − ΔW‖ / ‖ΔW‖``
per module (mean and max reported). ``‖ΔW‖/‖W‖`` (over all targets) puts the size of the update in context:
bf16 has 8 significant bits, so updates far below 2⁻⁹ ≈ 2e-3 of a weight mostly round away.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .common import Section, log

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
VALUES = (1e-4, 1e-3, 1e-2, 1e-1)


def set_vectors(adapter, value: float, pattern: str, seed: int = 0) -> None:
    """Set every vᵢ to ``value`` (``pattern='equal'``) or to ``±value`` with seeded signs (``'random-sign'``)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.vectors:
            if pattern == "equal":
                p.fill_(value)
            elif pattern == "random-sign":
                signs = torch.randint(0, 2, p.shape, generator=gen).to(torch.float32) * 2 - 1
                p.copy_((signs * value).to(p.dtype))
            else:
                raise ValueError(f"pattern should be 'equal' or 'random-sign', got {pattern!r}")


def run(model: nn.Module, budget: int = 13, values: Sequence[float] = VALUES,
        patterns: Sequence[str] = ("equal", "random-sign"), dtypes: Sequence[torch.dtype] = DTYPES,
        label: str = "SmolLM2-135M", seed: int = 0, progress: Optional[Callable[[str], None]] = log) -> Section:
    """Inject TinyLoRA(budget) into ``model`` (its real weights) and tabulate merge fidelity per dtype and |v|."""
    from tinylora_verl import TinyLoRAConfig, inject_tinylora

    start = time.perf_counter()
    progress = progress or (lambda s: None)
    progress(f"fidelity: injecting TinyLoRA(budget={budget}) into {label}")
    adapter = inject_tinylora(model, TinyLoRAConfig(budget=budget))
    w_sq = sum(m.weight.detach().float().square().sum().item() for m in adapter._modules_by_name.values())
    rows, cases = [], []
    try:
        for pattern in patterns:
            for value in values:
                set_vectors(adapter, value, pattern, seed)
                for dtype in dtypes:
                    overall, per = adapter.merge_fidelity(dtype)
                    rel = [m.rel_error for m in per]
                    d_sq = sum(m.delta_norm**2 for m in per)
                    dname = str(dtype).replace("torch.", "")
                    case = {"pattern": pattern, "value": value, "dtype": dname, "fidelity": overall,
                            "mean_rel_error": sum(rel) / len(rel), "max_rel_error": max(rel),
                            "delta_over_w": (d_sq / w_sq) ** 0.5}
                    cases.append(case)
                    rows.append([pattern, value, dname, case["delta_over_w"], overall, case["mean_rel_error"],
                                 case["max_rel_error"]])
                    progress(f"fidelity: {pattern} |v|={value:g} {dname}: fidelity {overall:.4f} "
                             f"mean rel_error {case['mean_rel_error']:.3e}")
    finally:
        adapter.remove()
    notes = [
        f"{label}, every target linear (TinyLoRA budget {budget}: {adapter.num_trainable} scalars, "
        f"{len(adapter.module_names)} modules); base weights as stored in the checkpoint.",
        "fidelity = ‖cast(W+ΔW) − cast(W)‖/‖ΔW‖ over all modules (1 = delivered in full; in bf16 a small ΔW "
        "rounds away or is amplified to the nearest representable step, so fidelity can also exceed 1); "
        "rel_error = ‖delivered − ΔW‖/‖ΔW‖ per module.",
        "with u = 1 (budget < number of modules) a sign flip of vᵢ only flips its group's ΔW, so 'equal' and "
        "'random-sign' agree up to round-off; they differ when u > 1.",
        "W + ΔW is formed in float32 from the pristine weights and cast once: what "
        "`merged_named_tensors(dtype=...)` sends to the rollout engine.",
    ]
    cols = ["v pattern", "|v|", "merge dtype", "‖ΔW‖/‖W‖", "fidelity", "mean rel_error", "max rel_error"]
    return Section("fidelity", "Merge fidelity by dtype and |v|", cols, rows, notes, {"cases": cases},
                   time.perf_counter() - start)
