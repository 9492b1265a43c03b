"""End-to-end hook: summarize a verl metrics JSONL (sync cost and step timings) into the report.

verl's file logger writes one JSON object per line, ``{"step": N, "data": {"metric": value, ...}}``. This reads
``tinylora/sync_bytes``, ``tinylora/sync_seconds``, ``tinylora/merge_fidelity`` and every ``timing_s/*`` key,
and compares the bytes sent per weight sync with their physical floor: the trained vector itself, e.g. 26 bytes
for 13 bf16 scalars, which is all a rollout engine that applied the adapter itself would need.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

from .common import Section, log

KEYS = ("tinylora/sync_bytes", "tinylora/sync_seconds", "tinylora/merge_fidelity")


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` for the keys of interest; malformed lines are skipped and counted."""
    series: dict[str, list[tuple[int, float]]] = {}
    bad = 0
    with open(path) as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                step, data = int(rec.get("step", i)), rec["data"]
            except (ValueError, KeyError, TypeError, AttributeError):
                bad += 1
                continue
            for k, v in data.items():
                if (k in KEYS or k.startswith("timing_s/")) and isinstance(v, (int, float)) and math.isfinite(v):
                    series.setdefault(k, []).append((step, float(v)))
    if bad:
        series["_malformed_lines"] = [(0, float(bad))]
    return series


def run(path: str | Path, floor_bytes: int = 26, skip_first: int = 1,
        progress: Optional[Callable[[str], None]] = log) -> Section:
    """Summarize ``path``; ``skip_first`` steps are left out of the statistics (warm-up, compilation)."""
    start = time.perf_counter()
    progress = progress or (lambda s: None)
    progress(f"e2e: reading {path}")
    series = read_metrics(path)
    malformed = int(series.pop("_malformed_lines", [(0, 0)])[0][1])
    rows, summary = [], {"path": str(path), "floor_bytes": floor_bytes, "metrics": {}}
    keys = [k for k in KEYS if k in series] + sorted(k for k in series if k.startswith("timing_s/"))
    steps_seen = sorted({s for v in series.values() for s, _ in v})
    kept = set(steps_seen[skip_first:]) if len(steps_seen) > skip_first else set(steps_seen)
    for k in keys:
        vals = [v for s, v in series[k] if s in kept]
        if not vals:
            continue
        med = statistics.median(vals)
        stat = {"n": len(vals), "median": med, "mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)}
        summary["metrics"][k] = stat
        rows.append([k, stat["n"], med, stat["mean"], stat["min"], stat["max"]])
    notes = [f"{len(steps_seen)} steps in the file; statistics over {len(kept)} (first {skip_first} skipped)."]
    if malformed:
        notes.append(f"{malformed} malformed line(s) skipped.")
    sb = summary["metrics"].get("tinylora/sync_bytes")
    if sb:
        summary["sync_bytes_over_floor"] = sb["median"] / floor_bytes
        notes.append(f"sync: median {sb['median']:.4g} B per weight sync vs the physical floor of {floor_bytes} B "
                     f"(the trained vector): ×{summary['sync_bytes_over_floor']:.3g}.")
    ss, step = summary["metrics"].get("tinylora/sync_seconds"), summary["metrics"].get("timing_s/step")
    if ss and step:
        summary["sync_share_of_step"] = ss["median"] / step["median"]
        notes.append(f"sync takes {100 * summary['sync_share_of_step']:.2f}% of the median step time.")
    if not rows:
        notes.append("no tinylora/* or timing_s/* metrics found in the file.")
    cols = ["metric", "n", "median", "mean", "min", "max"]
    return Section("e2e", f"End-to-end metrics from `{Path(path).name}`", cols, rows, notes, summary,
                   time.perf_counter() - start)
