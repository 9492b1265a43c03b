"""The CPU study behind ``docs/cpu-study.md``: do 13 TinyLoRA scalars move SmolLM2-135M's *correctness*?

    python -m tinylora_verl.apps.cpu_study [--out outputs/cpu_study] [--steps 30] [--test-size 500] [--dry-run]

The task is :mod:`tinylora_verl.tasks.arithmetic` (``--preset``), on which the base model answers part of the
problems right, so that correctness, not only the answer format, can move. Train and test problems come from
``--seed`` and are disjoint by construction. Stages (each is skipped when its output exists, so a stopped study
resumes):

1. **data**: ``tinylora-verl data arithmetic`` for ``--seed`` and for ``--redraw-seed`` (a second test set drawn
   after the fact, on which nothing was ever looked at);
2. **train** three arms on the same train problems in the same order (``tinylora.seed``):
   ``grpo13`` and ``grpo<B>`` (``+recipe=tinylora_arithmetic_cpu`` at 13 and ``--budget`` parameters, ``--steps``
   GRPO steps of 8 prompts x 4 samples, two optimizer steps each) and ``sft13`` (``+recipe=tinylora_arithmetic_cpu_sft``
   through verl's SFT trainer: the same 8 x ``--steps`` problems' worked solutions, 4 per optimizer step, so the
   same examples and optimizer steps). No setting is tuned here: the learning rate is the GSM8K CPU study's;
3. **eval** on ``--test-size`` test problems of each test set: the base, each arm's final adapter and the
   zero-adapter control (the adapter's serving path with v = 0), greedy and ``--samples`` samples at T = 1,
   through ``tinylora-verl eval``'s :func:`~tinylora_verl.apps.eval.run_eval`;
4. **report**: ``report.md`` (per test set, and the redrawn set's problems the first set does not hold, and
   decoding: accuracy with its 95% bootstrap interval, and each arm
   against the base on the same problems: the difference, its paired-bootstrap interval, the exact McNemar
   p-value for greedy), ``eval.csv``, ``paired.csv`` and ``curves.png`` (GRPO train reward, SFT loss, |v|).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..tasks.arithmetic import DEFAULT_PRESET, PRESETS
from ..tasks.data import prepare_arithmetic
from ..tasks.problems import load_benchmark
from .demo import run_cpu_recipe
from .eval import CONTROL, aggregate, default_decodings, run_eval
from .metrics import append_launch, read_metrics, v_values
from .models import default_cache_dir, prepare_smollm2
from .stats import compare_modes

GRPO_RECIPE = "tinylora_arithmetic_cpu"
SFT_RECIPE = "tinylora_arithmetic_cpu_sft"
# The GRPO recipe's 8 prompts a step in two mini-batches of 4; the SFT recipe's 4 examples a step.
GRPO_PROMPTS_PER_STEP, SFT_EXAMPLES_PER_STEP = 8, 4
SCORE_KEY = "critic/score/mean"
TRAIN_SIZE = 1000


@dataclass(frozen=True)
class Arm:
    """One trained adapter: ``kind`` grpo or sft, at ``budget`` parameters."""

    kind: str
    budget: int

    @property
    def name(self) -> str:
        return f"{self.kind}{self.budget}"


def arms_for(budget: int) -> list[Arm]:
    if not isinstance(budget, int) or budget <= 13:
        raise ValueError(f"--budget {budget!r} must be an int > 13 (the larger GRPO budget beside 13)")
    return [Arm("grpo", 13), Arm("grpo", budget), Arm("sft", 13)]


def sft_steps(grpo_steps: int) -> int:
    """SFT steps that show the SFT arm the GRPO arm's number of problems (and optimizer steps)."""
    return grpo_steps * GRPO_PROMPTS_PER_STEP // SFT_EXAMPLES_PER_STEP


def data_dir(out: Path, seed: int) -> Path:
    return out / "data" / f"seed{seed}"


def run_dir(out: Path, arm: Arm) -> Path:
    return out / "runs" / arm.name


def adapter_file(out: Path, arm: Arm, steps: int) -> Path:
    """Where the arm's final adapter lands (verl's GRPO checkpoints keep it under ``actor/``)."""
    if arm.kind == "grpo":
        return run_dir(out, arm) / f"global_step_{steps}" / "actor" / "tinylora_adapter.safetensors"
    return run_dir(out, arm) / f"global_step_{sft_steps(steps)}" / "tinylora_adapter.safetensors"


def data_overrides(data: Path, sft: bool) -> list[str]:
    prefix = "sft_" if sft else ""
    val = "sft_val" if sft else "test"
    return [f"data.train_files={data / f'{prefix}train.parquet'}", f"data.val_files={data / f'{val}.parquet'}"]


def sft_command(run: Path, steps: int, data: Path, budget: int) -> list[str]:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return [torchrun, "--standalone", "--nproc_per_node=1", "-m", "verl.trainer.sft_trainer", f"+recipe={SFT_RECIPE}",
            f"tinylora.budget={budget}", *data_overrides(data, sft=True), f"trainer.total_training_steps={steps}",
            f"trainer.default_local_dir={run}", "trainer.logger=[console,file]"]


def train(out: Path, arm: Arm, steps: int, data: Path) -> Path:
    """Train (or resume) one arm to its final step; returns its adapter file."""
    adapter = adapter_file(out, arm, steps)
    if adapter.is_file():
        return adapter
    run = run_dir(out, arm)
    print(f"[cpu_study] train {arm.name}", flush=True)
    if arm.kind == "grpo":
        res = run_cpu_recipe(run, steps, GRPO_RECIPE, [f"tinylora.budget={arm.budget}", *data_overrides(data, False),
                                                       f"trainer.rollout_data_dir={run / 'rollouts'}"])
        if res.returncode:
            raise SystemExit(f"{arm.name} failed (exit {res.returncode}); see {res.log}")
    else:
        run.mkdir(parents=True, exist_ok=True)
        log = run / "sft_trainer.log"
        env = {**os.environ, "TINYLORA_VERL_CACHE": str(default_cache_dir()),
               "VERL_FILE_LOGGER_PATH": str(run / f"metrics.run{int(time.time())}.jsonl")}
        cmd = sft_command(run, sft_steps(steps), data, arm.budget)
        print(f"[cpu_study] {' '.join(cmd[1:])}\n[cpu_study] output: {log}", flush=True)
        with open(log, "ab") as fh:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(run)).returncode
        append_launch(env["VERL_FILE_LOGGER_PATH"], run / "metrics.jsonl")
        if code:
            raise SystemExit(f"{arm.name} failed (exit {code}); see {log}")
    if not adapter.is_file():
        raise SystemExit(f"{arm.name} finished without its final adapter {adapter}")
    return adapter


def evaluate_test_set(out: Path, name: str, data: Path, adapters: dict[str, Path], limit: int, samples: int,
                      max_tokens: int, seed: int = 0) -> list[dict]:
    """Every arm's final adapter (the first with the base and the zero-adapter control) on the test set's first
    ``limit`` problems; returns the per-response rows with each adapter's mode renamed to its arm."""
    problems = load_benchmark("arithmetic", str(data), limit=limit)
    if len(problems) < limit:
        raise SystemExit(f"test set {data} has {len(problems)} problems; --test-size asks for {limit}")
    decodings = default_decodings(samples, 1.0, max_tokens)
    rows = []
    for i, (arm, adapter) in enumerate(adapters.items()):
        dest = out / "eval" / name / arm
        if not (dest / "summary.json").is_file():
            print(f"[cpu_study] eval {name}/{arm}: {len(problems)} problems", flush=True)
            run_eval(str(prepare_smollm2()), problems, decodings, str(dest), adapter=str(adapter), mode="auto",
                     with_base=i == 0, seed=seed)
        for line in (dest / "samples.jsonl").read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if r["mode"] in ("merged", "lora"):
                r["mode"] = arm if r["mode"] == "merged" else f"{arm}_lora"
            elif r["mode"] == CONTROL.format("merged"):
                r["mode"] = "control"
            elif r["mode"] == CONTROL.format("lora"):
                r["mode"] = "control_lora"
            r["test_set"] = name
            rows.append(r)
    return rows


def question_of(row: dict) -> str:
    """The problem a response answers: its prompt's last user turn."""
    return row["prompt"][-1]["content"]


def with_fresh_subset(rows: Sequence[dict], first: str, redraw: str) -> list[dict]:
    """``rows`` plus the redraw's rows on problems the first test set does not hold, as test set ``<redraw>_fresh``:
    two seeds draw from the same test split, so on a small task their test sets share problems."""
    seen = {question_of(r) for r in rows if r["test_set"] == first}
    fresh = [{**r, "test_set": f"{redraw}_fresh"} for r in rows
             if r["test_set"] == redraw and question_of(r) not in seen]
    return list(rows) + fresh


def summarize(rows: Sequence[dict], seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(summary, paired)``: per test set x decoding x mode the aggregate, and each mode against the base."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["test_set"], r["decoding"], r["mode"]), []).append(r)
    summary = [{"test_set": t, "decoding": d, "mode": m, **aggregate(g)} for (t, d, m), g in groups.items()]
    paired = []
    for test_set in dict.fromkeys(r["test_set"] for r in rows):
        part = [r for r in rows if r["test_set"] == test_set]
        paired += [{"test_set": test_set, **p} for p in compare_modes(part, reference="base", seed=seed)]
    return summary, paired


def _fmt(x: Optional[float], digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def write_report(out: Path, summary: list[dict], paired: list[dict], meta: dict) -> Path:
    for name, rows in (("eval.csv", summary), ("paired.csv", paired)):
        with open(out / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    pairs = {(p["test_set"], p["decoding"], p["mode"]): p for p in paired}
    lines = [f"# CPU study: {meta['preset']} arithmetic, SmolLM2-135M-Instruct", "",
             "```", json.dumps(meta, indent=1), "```", "",
             "| test set | decoding | model | accuracy [95% CI] | format | Δ vs base [95% CI] | p (McNemar / bootstrap) |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        p = pairs.get((s["test_set"], s["decoding"], s["mode"]))
        delta = "" if p is None else f"{p['diff']:+.3f} [{p['diff_low']:+.3f}, {p['diff_high']:+.3f}]"
        pval = "" if p is None else (_fmt(p["p_mcnemar"], 4) if p["p_mcnemar"] is not None
                                     else _fmt(p["p_bootstrap"], 4))
        lines.append(f"| {s['test_set']} | {s['decoding']} | {s['mode']} | {_fmt(s['acc'])} [{_fmt(s['acc_low'])}, "
                     f"{_fmt(s['acc_high'])}] | {_fmt(s['format_rate'])} | {delta} | {pval} |")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def plot_curves(out: Path, arms: Sequence[Arm], png: Path) -> Path:
    """GRPO train reward per step, SFT train loss per step, and mean |v| over training, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm in arms:
        rows = read_metrics(run_dir(out, arm) / "metrics.jsonl")
        key, ax = (SCORE_KEY, axes[0]) if arm.kind == "grpo" else ("train/loss", axes[1])
        curves = {ax: [(r["step"], r[key]) for r in rows if key in r],
                  axes[2]: [(r["step"], sum(abs(x) for x in v) / len(v)) for r in rows if (v := v_values(r))]}
        for target, pts in curves.items():
            if pts:
                target.plot(*zip(*pts), marker=".", label=arm.name)
    titles = ("GRPO train reward (8 prompts x 4 samples)", "SFT train loss (4 solutions)", "mean |v| (optimizer steps "
              "differ: GRPO logs once per 2)")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("trainer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tinylora_verl.apps.cpu_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/cpu_study", help="Study folder (data, runs, eval, report).")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="Arithmetic task preset.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the train and test problems.")
    p.add_argument("--redraw-seed", type=int, default=1, help="Seed of the second, redrawn test set.")
    p.add_argument("--budget", type=int, default=105, help="The larger GRPO budget beside 13.")
    p.add_argument("--steps", type=int, default=30, help="GRPO steps (SFT takes twice as many of half the size).")
    p.add_argument("--test-size", type=int, default=500, help="Test problems per test set.")
    p.add_argument("--samples", type=int, default=4, help="Sampled responses per problem at temperature 1.")
    p.add_argument("--max-tokens", type=int, default=128, help="Eval response length (the GRPO recipe's).")
    p.add_argument("--dry-run", action="store_true", help="Print the plan and exit.")
    args = p.parse_args(argv)
    try:
        arms = arms_for(args.budget)
    except ValueError as e:
        p.error(str(e))
    if args.redraw_seed == args.seed:
        p.error(f"--redraw-seed must differ from --seed (both {args.seed}): the redraw is a second test set")
    if args.steps < 1 or args.test_size < 1 or args.samples < 0:
        p.error(f"need --steps >= 1, --test-size >= 1 and --samples >= 0; got {args.steps}, {args.test_size}, "
                f"{args.samples}")
    out = Path(args.out).resolve()
    plan = [f"data: arithmetic {args.preset}, seed {args.seed} (train {TRAIN_SIZE}, test {args.test_size}) and "
            f"redraw seed {args.redraw_seed} -> {out / 'data'}"]
    plan += [f"train {a.name}: {SFT_RECIPE + f', {sft_steps(args.steps)} steps' if a.kind == 'sft' else GRPO_RECIPE}"
             f"{'' if a.kind == 'sft' else f', {args.steps} steps'} -> {run_dir(out, a)}" for a in arms]
    plan += [f"eval: base, control and {', '.join(a.name for a in arms)} on {args.test_size} problems of each test "
             f"set, greedy + {args.samples} samples", f"report: {out}/report.md, eval.csv, paired.csv, curves.png"]
    print("\n".join(f"[cpu_study] {line}" for line in plan), flush=True)
    if args.dry_run:
        return 0
    sets = {"seed": args.seed, "redraw": args.redraw_seed}
    for seed in sets.values():
        if not (data_dir(out, seed) / "test.parquet").is_file():
            prepare_arithmetic(args.preset, data_dir(out, seed), seed=seed, train_size=TRAIN_SIZE,
                               test_size=args.test_size)
    adapters = {a.name: train(out, a, args.steps, data_dir(out, args.seed)) for a in arms}
    rows = []
    for name, seed in sets.items():
        rows += evaluate_test_set(out, f"{name}{seed}", data_dir(out, seed), adapters, args.test_size, args.samples,
                                  args.max_tokens, seed=args.seed)
    names = [f"{name}{seed}" for name, seed in sets.items()]
    rows = with_fresh_subset(rows, *names)
    summary, paired = summarize(rows, seed=args.seed)
    meta = {"preset": args.preset, "seed": args.seed, "redraw_seed": args.redraw_seed, "budget": args.budget,
            "grpo_steps": args.steps, "sft_steps": sft_steps(args.steps), "test_size": args.test_size,
            "samples": args.samples, "max_tokens": args.max_tokens}
    print(f"[cpu_study] {plot_curves(out, arms, out / 'curves.png')}")
    report = write_report(out, summary, paired, meta)
    print(report.read_text() + f"[cpu_study] wrote {report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
