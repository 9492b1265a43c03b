"""The paper's sweep: budgets x learning rates x seeds as separate verl runs, best rate per budget, Figure 1.

    python -m tinylora_verl.apps.sweep --out outputs/sweep [--recipe tinylora_gsm8k] [--budgets 1,13,49,...]
        [--lrs 1e-7,...,2e-4] [--seeds 0,1,2] [--backend local|ray --address http://head:8265] [--dry-run]
        [--collect-only] [Hydra overrides ...]

Each grid point is ``python -m verl.trainer.main_ppo +recipe=<recipe> tinylora.budget=B tinylora.lr=LR
tinylora.seed=S`` with its own experiment name and checkpoint folder, run one after another here
(``--backend local``) or as blocking Ray jobs on a cluster (``--backend ray``: ``ray job submit`` with the
node preflight first, like ``recipes/ray_submit.sh``). Runs that finished are skipped on a rerun.

verl's file logger writes each run's metrics to ``<out>/metrics/<run>.jsonl`` (on a cluster ``--out`` must be
on storage every node sees). Collection takes each run's last value of ``--metric`` (default: GSM8K validation
accuracy), averages the seeds, picks per budget the rate with the best mean (the paper's protocol), and writes
``runs.csv``, ``best_lr.csv`` and ``figure1.png`` (accuracy against trained parameters, log scale; the step-0
validation, when logged, as the base-model line). Only what the runs logged is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from .metrics import first_and_last

# Figure 1 / Table 2 parameter counts for Qwen2.5-7B-Instruct (196 modules), plus full sharing (1 scalar).
PAPER_BUDGETS = (1, 13, 49, 196, 392, 6272, 100352)
# The paper's learning-rate grid (section 5).
PAPER_LRS = (1e-7, 5e-7, 1e-6, 5e-6, 1e-5, 1e-4, 2e-4)
PAPER_SEEDS = (0, 1, 2)
GSM8K_VAL_ACC = "val-core/openai/gsm8k/acc/mean@1"


@dataclass(frozen=True)
class SweepRun:
    """One grid point."""

    budget: int
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"b{self.budget}_lr{self.lr:g}_s{self.seed}"


def parse_list(text: str, kind: type, flag: str, minimum: float, exclusive: bool = False) -> list:
    """``"a,b"`` -> ``[kind(a), kind(b)]`` for a command-line flag: distinct values, each ``>= minimum`` (``>``
    when ``exclusive``); errors name the flag, its text and what is allowed."""
    try:
        values = [kind(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise ValueError(f"{flag} {text!r} must be comma-separated {kind.__name__}s") from e
    bound = f"{'>' if exclusive else '>='} {minimum:g}"
    if (not values or len(set(values)) != len(values)
            or any(v <= minimum if exclusive else v < minimum for v in values)):
        raise ValueError(f"{flag} {text!r} must list distinct {kind.__name__}s {bound}")
    return values


def build_grid(budgets: Sequence[int], lrs: Sequence[float], seeds: Sequence[int]) -> list[SweepRun]:
    return [SweepRun(b, lr, s) for b in budgets for lr in lrs for s in seeds]


def train_args(recipe: str, run: SweepRun, out: Path, overrides: Sequence[str]) -> list[str]:
    """``main_ppo`` arguments of one run (Hydra overrides; later ones win, so the user's go last)."""
    return [f"+recipe={recipe}", f"tinylora.budget={run.budget}", f"tinylora.lr={run.lr}",
            f"tinylora.seed={run.seed}", f"trainer.experiment_name=sweep_{run.name}",
            f"trainer.default_local_dir={out / 'runs' / run.name}", "trainer.logger=[console,file]", *overrides]


def ray_submit_command(ray: str, address: str, runtime_env: dict, python: str, nnodes: int, run: SweepRun,
                       args: Sequence[str]) -> list[str]:
    """A blocking ``ray job submit``: the node preflight, then ``main_ppo``.

    Ray shell-quotes each entrypoint word (``shlex.join``), so a chain must be one ``bash -c`` line, its words
    quoted here."""
    check = shlex.join([python, "-m", "tinylora_verl.verl.cluster", "check", "--nodes", str(nnodes)])
    train = shlex.join([python, "-m", "verl.trainer.main_ppo", *args])
    return [ray, "job", "submit", "--address", address, "--submission-id", f"tinylora-sweep-{run.name}-{int(time.time())}",
            "--runtime-env-json", json.dumps(runtime_env), "--", "bash", "-c", f"{check} && {train}"]


def metrics_path(out: Path, run: SweepRun) -> Path:
    return out / "metrics" / f"{run.name}.jsonl"


def collect(out: Path, grid: Sequence[SweepRun], metric: str = GSM8K_VAL_ACC) -> list[dict]:
    """Per budget, the learning rate with the best seed-mean final ``metric``; writes the CSVs and the figure."""
    import csv
    import statistics

    rows = []
    for run in grid:
        base, final = first_and_last(metrics_path(out, run), metric)
        rows.append({**asdict(run), "run": run.name, "final": final, "step0": base})
    with open(out / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    best = []
    for budget in sorted({r["budget"] for r in rows}):
        per_lr = {}
        for r in rows:
            if r["budget"] == budget and r["final"] is not None:
                per_lr.setdefault(r["lr"], []).append(r["final"])
        if not per_lr:
            continue
        lr = max(sorted(per_lr), key=lambda x: statistics.fmean(per_lr[x]))
        vals = per_lr[lr]
        best.append({"budget": budget, "params": budget, "best_lr": lr, "seeds": len(vals),
                     "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                     "per_lr_means": json.dumps({f"{k:g}": round(statistics.fmean(v), 4) for k, v in per_lr.items()})})
    with open(out / "best_lr.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["budget", "params", "best_lr", "seeds", "mean", "std", "per_lr_means"])
        writer.writeheader()
        writer.writerows(best)
    bases = [r["step0"] for r in rows if r["step0"] is not None]
    if best:
        plot_figure1(best, statistics.fmean(bases) if bases else None, metric, out / "figure1.png")
    return best


def plot_figure1(best: Sequence[dict], baseline: Optional[float], metric: str, png: Path) -> Path:
    """Accuracy against trained parameters (log x), one point per budget at its best rate, seed std as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [b["params"] for b in best]
    ax.errorbar(xs, [b["mean"] for b in best], yerr=[b["std"] for b in best], marker="o", capsize=3,
                label="TinyLoRA + GRPO (best lr per budget)")
    for b in best:
        ax.annotate(f"lr {b['best_lr']:g}", (b["params"], b["mean"]), textcoords="offset points", xytext=(4, -12),
                    fontsize=7)
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="grey", label="base model (step 0)")
    ax.set_xscale("log")
    ax.set_xlabel("trained parameters")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def load_runtime_env(path: Optional[str], metrics_file: Path) -> dict:
    """The job's runtime env: ``path`` (YAML) plus the run's ``VERL_FILE_LOGGER_PATH``."""
    import yaml

    env = yaml.safe_load(Path(path).read_text()) if path else {}
    env = dict(env or {})
    env["env_vars"] = {**env.get("env_vars", {}), "VERL_FILE_LOGGER_PATH": str(metrics_file)}
    return env


def launch(out: Path, grid: Sequence[SweepRun], recipe: str, overrides: Sequence[str], backend: str,
           address: Optional[str] = None, runtime_env: Optional[str] = None, nnodes: int = 1,
           python: str = sys.executable, ray: str = "ray") -> list[SweepRun]:
    """Run every grid point not finished yet, one at a time; returns the runs that failed."""
    for sub in ("metrics", "logs", "done", "runs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    failed = []
    for i, run in enumerate(grid, 1):
        done = out / "done" / run.name
        if done.is_file():
            print(f"[sweep] {i}/{len(grid)} {run.name}: done before, skipped", flush=True)
            continue
        args = train_args(recipe, run, out, overrides)
        metrics = metrics_path(out, run)
        if backend == "local":
            cmd = [python, "-m", "verl.trainer.main_ppo", *args]
            env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(metrics))
        else:
            cmd = ray_submit_command(ray, address, load_runtime_env(runtime_env, metrics), python, nnodes, run, args)
            env = dict(os.environ)
        start = time.time()
        print(f"[sweep] {i}/{len(grid)} {run.name}: running (log {out / 'logs' / run.name}.log)", flush=True)
        with open(out / "logs" / f"{run.name}.log", "ab") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(out)).returncode
        _, final = first_and_last(metrics, GSM8K_VAL_ACC)
        print(f"[sweep] {i}/{len(grid)} {run.name}: exit {rc} after {time.time() - start:.0f}s"
              + (f", last val acc {final:.4f}" if final is not None else ""), flush=True)
        if rc == 0:
            done.write_text(json.dumps({"cmd": cmd, "seconds": time.time() - start}))
        else:
            failed.append(run)
    return failed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tinylora_verl.apps.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/sweep", help="Sweep folder: runs/, metrics/, logs/, CSVs, figure.")
    p.add_argument("--recipe", default="tinylora_gsm8k", help="Recipe every run starts from.")
    p.add_argument("--budgets", default=",".join(map(str, PAPER_BUDGETS)), help="Trained-parameter budgets.")
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in PAPER_LRS), help="Learning rates of v.")
    p.add_argument("--seeds", default=",".join(map(str, PAPER_SEEDS)), help="Seeds (projections and data order).")
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local: main_ppo here, one run after another; ray: blocking Ray jobs on --address.")
    p.add_argument("--address", default=None, help="Ray dashboard address for --backend ray, e.g. http://head:8265.")
    p.add_argument("--runtime-env", default=None, help="Runtime env YAML for the Ray jobs (recipes/runtime_env.yaml).")
    p.add_argument("--nnodes", type=int, default=1, help="Nodes per run with --backend ray (sets trainer.nnodes; "
                                                         "the preflight checks the cluster has them).")
    p.add_argument("--python", default=None, help="Python that runs main_ppo (default: this one for local, "
                                                  "python3 on the nodes for ray).")
    p.add_argument("--ray", default="ray", help="ray CLI for --backend ray.")
    p.add_argument("--metric", default=GSM8K_VAL_ACC, help="Metric collected per run (last logged value).")
    p.add_argument("--dry-run", action="store_true", help="Print the plan and the first command; run nothing.")
    p.add_argument("--collect-only", action="store_true", help="Only collect finished runs and plot.")
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run, key=value.")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        grid = build_grid(parse_list(args.budgets, int, "--budgets", 1),
                          parse_list(args.lrs, float, "--lrs", 0, exclusive=True),
                          parse_list(args.seeds, int, "--seeds", 0))
    except ValueError as e:
        p.error(str(e))
    if args.backend == "ray" and not args.address:
        p.error("--backend ray needs --address (the cluster's dashboard, e.g. http://head-node:8265)")
    if args.nnodes < 1:
        p.error(f"--nnodes must be >= 1, got {args.nnodes}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"overrides must look like key=value; got {bad}")
    out = Path(args.out).resolve()
    if args.backend == "ray":
        args.overrides = [f"trainer.nnodes={args.nnodes}", *args.overrides]
    budgets = sorted({r.budget for r in grid})
    python = args.python or (sys.executable if args.backend == "local" else "python3")
    print(f"[sweep] {len(grid)} runs of +recipe={args.recipe}: budgets {budgets} x {len(grid) // len(budgets)} "
          f"(lr, seed) pairs, backend {args.backend}, out {out}", flush=True)
    if args.dry_run:
        for run in grid:
            print(f"[sweep] plan {run.name}: budget {run.budget}, lr {run.lr:g}, seed {run.seed}")
        first = train_args(args.recipe, grid[0], out, args.overrides)
        cmd = ([python, "-m", "verl.trainer.main_ppo", *first] if args.backend == "local" else
               ray_submit_command(args.ray, args.address, load_runtime_env(args.runtime_env, metrics_path(out, grid[0])),
                                  python, args.nnodes, grid[0], first))
        print("[sweep] first command: " + " ".join(cmd))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps({"recipe": args.recipe, "overrides": args.overrides,
                                               "runs": [asdict(r) for r in grid]}, indent=1))
    failed = [] if args.collect_only else launch(out, grid, args.recipe, args.overrides, args.backend, args.address,
                                                 args.runtime_env, args.nnodes, python, args.ray)
    best = collect(out, grid, args.metric)
    for b in best:
        print(f"[sweep] budget {b['budget']}: best lr {b['best_lr']:g}, {args.metric} {b['mean']:.4f} "
              f"+- {b['std']:.4f} over {b['seeds']} seed(s)")
    print(f"[sweep] wrote {out / 'best_lr.csv'}" + (f" and {out / 'figure1.png'}" if best else " (no run logged "
                                                    f"{args.metric} yet)"))
    if failed:
        print(f"[sweep] {len(failed)} run(s) failed: {[r.name for r in failed]}; see {out / 'logs'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
