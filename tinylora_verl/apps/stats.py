"""Uncertainty of evaluation results: bootstrap intervals over problems and paired tests on the same problems.

The unit of resampling is the problem, not the response: K samples of one problem are not independent draws of
the benchmark. For one benchmark x decoding x mode, each problem contributes its mean correctness over its K
responses (0 or 1 when greedy).

- :func:`bootstrap_interval`: percentile interval of the mean over problems, resampled with replacement from a
  seeded ``random.Random``.
- :func:`paired_bootstrap`: the mean per-problem difference between two modes on the problems both answered, its
  percentile interval, and a two-sided p-value (twice the share of resampled differences on the far side of 0).
- :func:`mcnemar_exact`: for greedy (0/1) correctness, the exact McNemar test: under H0 the problems that only one
  mode solved split 50/50, so ``p = min(1, 2·P[Binomial(n01 + n10, 1/2) <= min(n01, n10)])``.
"""

from __future__ import annotations

import math
import random
from typing import Mapping, Optional, Sequence

LEVEL = 0.95
RESAMPLES = 2000


def _percentiles(values: list[float], level: float) -> tuple[float, float]:
    values = sorted(values)
    tail = (1 - level) / 2
    lo = values[min(len(values) - 1, max(0, int(math.floor(tail * len(values)))))]
    hi = values[min(len(values) - 1, max(0, int(math.ceil((1 - tail) * len(values))) - 1))]
    return lo, hi


def _check(level: float, resamples: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level should be in (0, 1), but the value passed is {level!r}")
    if resamples < 100:
        raise ValueError(f"resamples should be >= 100 for a usable interval, but the value passed is {resamples!r}")


def bootstrap_interval(values: Sequence[float], seed: int = 0, level: float = LEVEL,
                       resamples: int = RESAMPLES) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap interval of ``mean(values)`` (one value per problem); ``(None, None)`` when empty."""
    _check(level, resamples)
    if not values:
        return None, None
    rng, n = random.Random(seed), len(values)
    means = [sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples)]
    return _percentiles(means, level)


def paired_bootstrap(a: Mapping[int, float], b: Mapping[int, float], seed: int = 0, level: float = LEVEL,
                     resamples: int = RESAMPLES) -> dict:
    """``mean(b - a)`` over the problems in both, its interval and a two-sided bootstrap p-value."""
    _check(level, resamples)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two modes share no problem; a paired comparison needs the same problems")
    diffs = [b[i] - a[i] for i in shared]
    n, rng = len(diffs), random.Random(seed)
    means = [sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples)]
    lo, hi = _percentiles(means, level)
    below = sum(m <= 0 for m in means) / resamples
    above = sum(m >= 0 for m in means) / resamples
    return {"problems": n, "diff": sum(diffs) / n, "diff_low": lo, "diff_high": hi,
            "p_bootstrap": min(1.0, 2 * min(below, above))}


def mcnemar_exact(a: Mapping[int, bool], b: Mapping[int, bool]) -> dict:
    """Exact McNemar test of ``a`` vs ``b`` correctness on the problems in both: ``n01`` = solved only by ``b``,
    ``n10`` = only by ``a``."""
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two modes share no problem; McNemar's test needs the same problems")
    n01 = sum(1 for i in shared if b[i] and not a[i])
    n10 = sum(1 for i in shared if a[i] and not b[i])
    n, k = n01 + n10, min(n01, n10)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, j) for j in range(k + 1)) / 2 ** n)
    return {"n01": n01, "n10": n10, "p_mcnemar": p}


def per_problem(rows: Sequence[Mapping]) -> dict[int, float]:
    """``{problem index: mean correctness over its responses}`` from per-sample rows."""
    groups: dict[int, list[float]] = {}
    for r in rows:
        groups.setdefault(r["index"], []).append(float(r["correct"]))
    return {i: sum(v) / len(v) for i, v in groups.items()}


def _one_response_each(rows: Sequence[Mapping]) -> bool:
    return len(rows) == len({r["index"] for r in rows})


def compare_modes(rows: Sequence[Mapping], reference: str = "base", seed: int = 0) -> list[dict]:
    """For every benchmark x decoding with ``reference`` beside other modes: each mode against the reference on
    the same problems (paired bootstrap; exact McNemar too where every problem has one 0/1 answer)."""
    by_key: dict[tuple[str, str, str], list[Mapping]] = {}
    for r in rows:
        by_key.setdefault((r["benchmark"], r["decoding"], r["mode"]), []).append(r)
    out = []
    for (bench, dec, mode), mode_rows in by_key.items():
        ref_rows = by_key.get((bench, dec, reference))
        if mode == reference or ref_rows is None:
            continue
        a, b = per_problem(ref_rows), per_problem(mode_rows)
        row = {"benchmark": bench, "decoding": dec, "mode": mode, "reference": reference,
               "acc": sum(b.values()) / len(b), "reference_acc": sum(a.values()) / len(a),
               **paired_bootstrap(a, b, seed=seed), "n01": None, "n10": None, "p_mcnemar": None}
        if _one_response_each(ref_rows) and _one_response_each(mode_rows):
            row.update(mcnemar_exact({i: v == 1.0 for i, v in a.items()}, {i: v == 1.0 for i, v in b.items()}))
        out.append(row)
    return out


__all__ = ["LEVEL", "RESAMPLES", "bootstrap_interval", "compare_modes", "mcnemar_exact", "paired_bootstrap",
           "per_problem"]
