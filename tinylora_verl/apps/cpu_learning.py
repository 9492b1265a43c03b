"""The CPU learning study behind ``docs/cpu-learning.md``: does GRPO on 13 TinyLoRA scalars move SmolLM2's GSM8K?

    python -m tinylora_verl.apps.cpu_learning [--out outputs/cpu_learning] [--lrs 0.003,0.01,0.03] [--dry-run]

Stages (each is skipped when its output exists, so an interrupted study resumes):

1. **sweep**: ``tinylora_gsm8k_cpu_learn`` for ``--sweep-steps`` steps at each learning rate, same seed, so every
   rate sees the same train prompts in the same order (a paired comparison);
2. **select**: the rate with the highest mean train reward over the sweep steps (ties: the smaller rate). Only
   train problems enter the choice;
3. **continue**: the winning run resumes from its last checkpoint up to ``--steps`` (the recipe's own length);
4. **eval**: ``tinylora-verl eval`` on ``--eval-limit`` GSM8K *test* problems, base and trained adapter, greedy
   and ``--samples`` samples at temperature 1, with the training prompt;
5. **report**: ``sweep.csv``, ``eval.csv``, ``curves.png`` (train reward, accuracy and format rate per step;
   v over training) and ``report.md`` in ``--out``.

Train accuracy and format rate per step come from verl's rollout dumps (``trainer.rollout_data_dir``): with the
recipe's reward a sample scores 1 (exact answer), ``format_score`` (well-formed wrong answer) or 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from .demo import run_cpu_recipe
from .metrics import read_metrics, v_values
from .models import prepare_smollm2
from .sweep import parse_list

RECIPE = "tinylora_gsm8k_cpu_learn"
SCORE_KEY = "critic/score/mean"


def parse_lrs(text: str) -> list[float]:
    """``"0.003,0.01"`` -> ``[0.003, 0.01]``; every rate a number > 0, none repeated."""
    return parse_list(text, float, "--lrs", 0, exclusive=True)


def run_dir(out: Path, lr: float) -> Path:
    return out / "sweep" / f"lr{lr:g}"


def rollout_stats(run: Path, format_score: float = 0.1) -> dict[int, dict]:
    """Per step, from verl's rollout dumps: ``acc`` (score 1), ``format_rate`` (score >= format_score) and n."""
    stats = {}
    for path in sorted((run / "rollouts").glob("*.jsonl")):
        scores = [float(json.loads(line)["score"]) for line in path.read_text().splitlines() if line.strip()]
        if scores:
            stats[int(path.stem)] = {
                "acc": sum(s >= 1.0 for s in scores) / len(scores),
                # float32 round trip: 0.1 comes back as 0.10000000149.
                "format_rate": sum(s >= format_score - 1e-6 for s in scores) / len(scores),
                "n": len(scores),
            }
    return stats


def select_lr(rewards: dict[float, list[float]]) -> float:
    """The rate with the highest mean reward over the steps every run finished (ties: the smaller rate).

    Comparing the same steps keeps the comparison paired: one data seed, so step k shows every rate the same
    prompts."""
    if not rewards or any(not r for r in rewards.values()):
        raise ValueError(f"every swept learning rate needs at least one logged step; got steps per rate "
                         f"{ {lr: len(r) for lr, r in rewards.items()} }")
    common = min(len(r) for r in rewards.values())
    return max(sorted(rewards), key=lambda lr: (sum(rewards[lr][:common]) / common, -lr))


def eval_command(model: str, adapter: str, out: Path, limit: int, samples: int, max_tokens: int) -> list[str]:
    return [sys.executable, "-m", "tinylora_verl.apps.cli", "eval", "--model", model, "--adapter", adapter,
            "--with-base", "--mode", "merged", "--benchmarks", "gsm8k", "--split", "test",
            "--limit", str(limit), "--samples", str(samples), "--temperature", "1.0", "--max-tokens", str(max_tokens),
            "--prompt-style", "oneshot", "--out", str(out)]


def plot_curves(runs: dict[str, Path], main: Path, png: Path) -> Path:
    """Train reward / accuracy / format rate per step for each run, and the main run's v over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, run in runs.items():
        rows = read_metrics(run / "metrics.jsonl")
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r.get(SCORE_KEY, float("nan")) for r in rows], marker=".", label=label)
        stats = rollout_stats(run)
        s = sorted(stats)
        if run == main and s:
            axes[1].plot(s, [stats[k]["format_rate"] for k in s], marker=".", label=f"format rate ({label})")
            axes[1].plot(s, [stats[k]["acc"] for k in s], marker=".", label=f"exact answers ({label})")
    rows = read_metrics(main / "metrics.jsonl")
    vs = [v_values(r) for r in rows]
    for i in range(len(vs[0]) if vs and vs[0] else 0):
        axes[2].plot([r["step"] for r in rows], [v[i] for v in vs], lw=1)
    for ax, title in zip(axes, ("train reward per step (8 prompts x 4)", "train samples", "v (13 scalars)")):
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def write_report(out: Path, lrs: Sequence[float], best: float, sweep_steps: int) -> Path:
    """``sweep.csv``, ``eval.csv`` (when the eval ran) and ``report.md`` (both tables) in ``out``."""
    lines = ["| lr | steps | mean train reward (steps 1-%d) | format rate | exact answers | final mean abs v |" % sweep_steps,
             "|---|---|---|---|---|---|"]
    with open(out / "sweep.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["lr", "steps", "mean_reward", "format_rate", "acc", "final_mean_abs_v", "selected"])
        for lr in lrs:
            run = run_dir(out, lr)
            rows = read_metrics(run / "metrics.jsonl")[:sweep_steps]
            stats = [v for k, v in rollout_stats(run).items() if k <= sweep_steps]
            reward = sum(r[SCORE_KEY] for r in rows) / max(len(rows), 1)
            fmt = sum(s["format_rate"] for s in stats) / max(len(stats), 1)
            acc = sum(s["acc"] for s in stats) / max(len(stats), 1)
            v = v_values(rows[-1]) if rows else []
            mav = sum(abs(x) for x in v) / max(len(v), 1)
            w.writerow([lr, len(rows), f"{reward:.4f}", f"{fmt:.4f}", f"{acc:.4f}", f"{mav:.4f}", lr == best])
            lines.append(f"| {lr:g}{' (selected)' if lr == best else ''} | {len(rows)} | {reward:.3f} | {fmt:.3f} | "
                         f"{acc:.3f} | {mav:.3f} |")
    summary = out / "eval" / "summary.json"
    if summary.is_file():
        rows = json.loads(summary.read_text())["rows"]
        lines += ["", "| model | decoding | problems | responses | strict acc | flexible acc | format rate | mean reward |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['mode']} | {r['decoding']} | {r['problems']} | {r['responses']} | {r['acc']:.3f} | "
                         f"{r['acc_lenient']:.3f} | {r['format_rate']:.3f} | {r['mean_reward']:.3f} |")
        (out / "eval.csv").write_text((out / "eval" / "summary.csv").read_text())
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tinylora_verl.apps.cpu_learning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/cpu_learning", help="Study folder (runs, eval, tables, plot).")
    p.add_argument("--lrs", default="0.003,0.01,0.03", help="Learning rates of v to sweep, comma-separated.")
    p.add_argument("--sweep-steps", type=int, default=10, help="GRPO steps per sweep run.")
    p.add_argument("--steps", type=int, default=40, help="Total steps of the selected run.")
    p.add_argument("--eval-limit", type=int, default=128, help="GSM8K test problems to evaluate (first N).")
    p.add_argument("--samples", type=int, default=4, help="Sampled responses per test problem at temperature 1.")
    p.add_argument("--max-tokens", type=int, default=256, help="Eval response length (the recipe trains with 256).")
    p.add_argument("--dry-run", action="store_true", help="Print the plan and exit.")
    args = p.parse_args(argv)
    try:
        lrs = parse_lrs(args.lrs)
    except ValueError as e:
        p.error(str(e))
    if not 1 <= args.sweep_steps <= args.steps:
        p.error(f"need 1 <= --sweep-steps <= --steps, got --sweep-steps {args.sweep_steps} --steps {args.steps}")
    out = Path(args.out).resolve()
    plan = [f"sweep: {RECIPE} x lr {lr:g}, {args.sweep_steps} steps -> {run_dir(out, lr)}" for lr in lrs]
    plan += [f"select: highest mean train reward; continue it to {args.steps} steps",
             f"eval: {args.eval_limit} GSM8K test problems, greedy + {args.samples} samples, base and adapter",
             f"report: {out}/report.md, sweep.csv, eval.csv, curves.png"]
    print("\n".join(f"[cpu_learning] {line}" for line in plan), flush=True)
    if args.dry_run:
        return 0
    for lr in lrs:
        run = run_dir(out, lr)
        if len(read_metrics(run / "metrics.jsonl")) < args.sweep_steps:
            print(f"[cpu_learning] sweep lr={lr:g}", flush=True)
            res = run_cpu_recipe(run, args.sweep_steps, RECIPE, [f"tinylora.lr={lr}"])
            if res.returncode:
                raise SystemExit(f"sweep run lr={lr:g} failed (exit {res.returncode}); see {res.log}")
    rewards = {lr: [r[SCORE_KEY] for r in read_metrics(run_dir(out, lr) / "metrics.jsonl")][: args.sweep_steps]
               for lr in lrs}
    best = select_lr(rewards)
    main_run = run_dir(out, best)
    print(f"[cpu_learning] selected lr={best:g}; continuing to {args.steps} steps", flush=True)
    if len(read_metrics(main_run / "metrics.jsonl")) < args.steps:
        res = run_cpu_recipe(main_run, args.steps, RECIPE, [f"tinylora.lr={best}"])
        if res.returncode:
            raise SystemExit(f"main run lr={best:g} failed (exit {res.returncode}); see {res.log}")
    adapter = main_run / f"global_step_{args.steps}" / "actor" / "tinylora_adapter.safetensors"
    if not (out / "eval" / "summary.json").is_file():
        cmd = eval_command(str(prepare_smollm2()), str(adapter), out / "eval", args.eval_limit, args.samples,
                           args.max_tokens)
        print("[cpu_learning] " + " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
    runs = {f"lr {lr:g}": run_dir(out, lr) for lr in lrs}
    print(f"[cpu_learning] {plot_curves(runs, main_run, out / 'curves.png')}")
    report = write_report(out, lrs, best, args.sweep_steps)
    print(report.read_text() + f"[cpu_learning] wrote {report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
