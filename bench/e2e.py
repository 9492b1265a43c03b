"""End-to-end hook: summarize a verl metrics JSONL (sync cost and step timings) into the report.

verl's file logger writes one JSON object per line, ``{"step": N, "data": {"metric": value, ...}}``. This reads
``tinylora/sync_bytes``, ``tinylora/sync_seconds``, ``tinylora/merge_fidelity`` and every ``timing_s/*`` key,
and compares the bytes sent per weight sync with their physical floor: the trained vector itself, e.g. 26 bytes
for 13 bf16 scalars, which is all a rollout engine that applied the adapter itself would need.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Optional

from .common import Section, log

KEYS = ("tinylora/sync_bytes", "tinylora/sync_seconds", "tinylora/merge_fidelity")
# Side by side across runs (compare): phases of a step, sync, the actor's memory, the trainer/rollout mismatch.
COMPARE_KEYS = ("timing_s/gen", "timing_s/old_log_prob", "timing_s/update_actor", "timing_s/update_weights",
                "timing_s/step", "tinylora/sync_bytes", "tinylora/sync_seconds", "tinylora/merge_fidelity",
                "perf/peak_rss_gb", "perf/cpu_memory_used_gb", "training/rollout_probs_diff_mean", "rollout_corr/k3_kl", "critic/score/mean")


def read_metrics(path: str | Path, keys: tuple[str, ...] = KEYS) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` for ``keys`` and every ``timing_s/*`` (tinylora_verl's one metrics
    reader); malformed lines are skipped and counted under ``_malformed_lines``. verl prefixes worker metrics with
    the role (``actor/tinylora/...``); the prefix is dropped."""
    from tinylora_verl.apps import metrics

    rows = metrics.read_metrics(path)
    out = metrics.series(rows, keys=keys, strip_prefix="actor/", patterns=(r"^timing_s/",))
    if rows.malformed:
        out["_malformed_lines"] = [(0, float(rows.malformed))]
    return out


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


def lora_sync_bytes(model_dir: str | Path, rank: int, value_bytes: int = 2) -> int:
    """Bytes a rank-``rank`` LoRA of every TinyLoRA target linear takes on the wire,
    ``Σ rank·(in + out)·value_bytes``: what verl's worker streams each step for its own LoRA (the TinyLoRA engine
    measures only TinyLoRA's syncs)."""
    from tinylora_verl.apps.models import load_config, meta_model
    from tinylora_verl.core.adapter import find_target_modules
    from tinylora_verl.core.config import DEFAULT_TARGET_MODULES

    modules = find_target_modules(meta_model(load_config(str(model_dir))), DEFAULT_TARGET_MODULES)
    return sum(rank * (m.in_features + m.out_features) * value_bytes for m in modules.values())


def compare(runs: dict[str, str | Path], skip_first: int = 1, floor_bytes: int = 26,
            progress: Optional[Callable[[str], None]] = log, computed: Optional[dict[str, dict]] = None) -> Section:
    """Median of each :data:`COMPARE_KEYS` metric per run, side by side, with each run's ratio to the first.
    ``computed`` adds values a run does not log (a verl LoRA run's sync bytes) under its label."""
    start = time.perf_counter()
    progress = progress or (lambda s: None)
    labels = list(runs)
    medians: dict[str, dict[str, float]] = {}
    for label, path in runs.items():
        progress(f"e2e: reading {label} = {path}")
        series = read_metrics(path, COMPARE_KEYS)
        series.pop("_malformed_lines", None)
        steps = sorted({s for v in series.values() for s, _ in v})
        kept = set(steps[skip_first:]) if len(steps) > skip_first else set(steps)
        medians[label] = {k: statistics.median([x for s, x in v if s in kept]) for k, v in series.items()
                          if any(s in kept for s, _ in v)}
        for k, v in (computed or {}).get(label, {}).items():
            medians[label].setdefault(k, v)
    keys = [k for k in COMPARE_KEYS if any(k in m for m in medians.values())]
    keys += sorted({k for m in medians.values() for k in m if k.startswith("timing_s/")} - set(keys))
    first = labels[0]
    rows = []
    for k in keys:
        vals = [medians[lb].get(k) for lb in labels]
        ratios = [f"{v / vals[0]:.3g}" if v is not None and vals[0] not in (None, 0) else "-" for v in vals[1:]]
        rows.append([k] + [("-" if v is None else v) for v in vals] + ratios)
    cols = ["metric"] + [f"{lb} (median)" for lb in labels] + [f"{lb} / {first}" for lb in labels[1:]]
    notes = [f"Medians over each run's steps after the first {skip_first} (warm-up); runs: "
             + ", ".join(f"{lb} = `{Path(p).parent.name}/{Path(p).name}`" for lb, p in runs.items()) + "."]
    for lb in labels:
        sb = medians[lb].get("tinylora/sync_bytes")
        if sb:
            notes.append(f"{lb}: {sb:.4g} B per sync, ×{sb / floor_bytes:.3g} the physical floor of {floor_bytes} B.")
    for lb, values in (computed or {}).items():
        notes.append(f"{lb}: {', '.join(values)} computed from the adapter's shapes, not logged by the run.")
    summary = {"runs": {lb: str(p) for lb, p in runs.items()}, "medians": medians, "floor_bytes": floor_bytes}
    return Section("e2e-compare", "End-to-end step on CPU, side by side", cols, rows, notes, summary,
                   time.perf_counter() - start)


# (label, recipe): the same CPU model, data, batch sizes and rollout; only the adapter and its sync differ.
RECIPES = (("TinyLoRA merged", "tinylora_gsm8k_cpu"), ("TinyLoRA lora sync", "tinylora_gsm8k_cpu_lora"),
           ("TinyLoRA native sync", "tinylora_gsm8k_cpu_native"), ("verl LoRA r=8", "tinylora_gsm8k_cpu_verl_lora"))
# The runs whose sync the TinyLoRA engine does not measure: label -> the rank of verl's own LoRA.
VERL_LORA_RANKS = {"verl LoRA r=8": 8}
# Paired seeds, no checkpoints: the runs time steps, they do not keep them.
RUN_OVERRIDES = ("actor_rollout_ref.rollout.seed=0", "data.seed=0", "trainer.save_freq=-1")


def run_recipes(out_dir: str | Path, steps: int = 3, recipes=RECIPES, timeout: float = 3600,
                progress: Optional[Callable[[str], None]] = log) -> dict[str, Path]:
    """Run each recipe for ``steps`` GRPO steps into ``out_dir/<recipe>`` one after another (two CPU stacks at
    once do not fit in memory), reusing a run whose metrics already hold ``steps`` steps; ``{label: JSONL}``."""
    from tinylora_verl.apps.demo import run_cpu_recipe
    from tinylora_verl.apps.metrics import read_metrics as read_rows

    progress = progress or (lambda s: None)
    paths = {}
    for label, recipe in recipes:
        run_dir = Path(out_dir) / recipe
        metrics = run_dir / "metrics.jsonl"
        have = len(read_rows(metrics))
        if have >= steps:
            progress(f"e2e: {label}: reusing {metrics} ({have} steps)")
        else:
            progress(f"e2e: {label}: {steps} steps of +recipe={recipe} into {run_dir} (log: {run_dir / 'main_ppo.log'})")
            res = run_cpu_recipe(run_dir, steps, recipe, overrides=RUN_OVERRIDES, timeout=timeout, echo=True)
            if res.returncode != 0:
                tail = "\n".join(res.log_text().splitlines()[-20:])
                raise RuntimeError(f"e2e: +recipe={recipe} failed (exit {res.returncode}); end of its log:\n{tail}")
        paths[label] = metrics
    return paths
