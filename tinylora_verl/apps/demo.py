"""The CPU demo: real GRPO steps of 13 TinyLoRA parameters through verl's unchanged ``main_ppo``.

    python -m tinylora_verl.apps.demo [--steps 4] [--out outputs/demo] [--recipe tinylora_gsm8k_cpu] [overrides ...]

Prepares SmolLM2-135M-Instruct and the GSM8K parquet files once (cached), launches
``python -m verl.trainer.main_ppo +recipe=<recipe>`` with verl's file logger on, and prints one line per step
from its metrics (reward, v, trainer/vLLM mismatch, seconds); verl's own output goes to ``main_ppo.log``.
Extra ``key=value`` arguments are passed to Hydra. This module only launches verl, it imports none of it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .metrics import append_launch, read_metrics, v_values
from .models import default_cache_dir, prepare_smollm2


@dataclass
class RunResult:
    """What a ``main_ppo`` run left behind."""

    returncode: int
    run_dir: Path
    log: Path
    metrics: list[dict] = field(default_factory=list)
    log_offset: int = 0

    def log_text(self) -> str:
        """This launch's part of ``main_ppo.log`` (a resumed run appends to the same file)."""
        with open(self.log, "rb") as fh:
            fh.seek(self.log_offset)
            return fh.read().decode(errors="replace")

    def checkpoints(self) -> list[Path]:
        return sorted(self.run_dir.glob("global_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))


def prepare_data(cache: Path) -> Path:
    """GSM8K train/test parquet in ``<cache>/data/gsm8k_oneshot`` with the one-shot prompt the CPU recipe reads
    (from $TINYLORA_VERL_GSM8K_DIR, ../shared or the hub; see tinylora_verl.tasks.data)."""
    from ..tasks.data import prepare_gsm8k

    out = cache / "data" / "gsm8k_oneshot"
    if not ((out / "train.parquet").is_file() and (out / "test.parquet").is_file()):
        prepare_gsm8k(None, out, prompt_style="oneshot")
    return out


def progress_line(row: dict, total: int) -> str:
    def get(*keys):
        for k in keys:
            if k in row:
                return row[k]
        return float("nan")

    v = v_values(row)
    shown = "[" + " ".join(f"{x:+.3f}" for x in v) + "]" if v else "-"
    return (
        f"step {row['step']}/{total} | reward {get('critic/score/mean'):.3f} | v {shown} | "
        f"mismatch kl {get('rollout_corr/kl'):+.2e} | fidelity {get('actor/tinylora/merge_fidelity'):.3f} | "
        f"{get('timing_s/step'):.1f}s"
    )


def run_cpu_recipe(
    out: Path,
    steps: int,
    recipe: str = "tinylora_gsm8k_cpu",
    overrides: Sequence[str] = (),
    timeout: Optional[float] = None,
    echo: bool = True,
    env: Optional[dict[str, str]] = None,
    kill_when: Optional[Callable[[], bool]] = None,
) -> RunResult:
    """Run verl's ``main_ppo`` with ``recipe`` for ``steps`` steps into ``out``; resumes from ``out``'s latest
    checkpoint if there is one (verl's ``resume_mode=auto``). ``overrides`` follow the recipe on the command line
    (a ``+hardware=`` overlay among them); ``env`` is merged over this process's environment. ``kill_when`` is
    polled every 2 s; when it returns True the run and everything it started get SIGKILL, as a crash would."""
    cache = default_cache_dir()
    prepare_smollm2()
    prepare_data(cache)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    seen = len(read_metrics(metrics_path))
    log = out / "main_ppo.log"
    log_offset = log.stat().st_size if log.is_file() else 0
    env = {**os.environ, "TINYLORA_VERL_CACHE": str(cache), **(env or {}),
           "VERL_FILE_LOGGER_PATH": str(out / f"metrics.run{int(time.time())}.jsonl")}
    cmd = [
        sys.executable, "-m", "verl.trainer.main_ppo", f"+recipe={recipe}",
        f"trainer.total_training_steps={steps}", "trainer.logger=[console,file]",
        f"trainer.default_local_dir={out}", f"hydra.run.dir={out / 'hydra'}", *overrides,
    ]
    if echo:
        print(f"[demo] {' '.join(cmd[1:])}\n[demo] verl's output: {log}", flush=True)
    start = time.time()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(out),
                                start_new_session=True)
        printed = 0
        while proc.poll() is None:
            if timeout is not None and time.time() - start > timeout:
                _kill_session(proc)
                raise TimeoutError(f"main_ppo did not finish within {timeout:.0f}s; see {log}")
            if kill_when is not None and kill_when():
                _kill_session(proc)
                break
            printed = _echo_new(env["VERL_FILE_LOGGER_PATH"], printed, steps, echo)
            time.sleep(2)
        _echo_new(env["VERL_FILE_LOGGER_PATH"], printed, steps, echo)
    append_launch(env["VERL_FILE_LOGGER_PATH"], metrics_path)
    rows = read_metrics(metrics_path)[seen:]
    return RunResult(proc.returncode, out, log, rows, log_offset)


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the run's whole session (its Ray processes too), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _echo_new(path: str, printed: int, total: int, echo: bool) -> int:
    rows = read_metrics(Path(path))
    if echo:
        for row in rows[printed:]:
            print(progress_line(row, total), flush=True)
    return len(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tinylora_verl.apps.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="Total GRPO steps (a resumed run continues up to this).")
    p.add_argument("--out", default="outputs/demo", help="Run folder: checkpoints, metrics.jsonl, main_ppo.log.")
    p.add_argument("--recipe", default="tinylora_gsm8k_cpu", help="Hydra recipe (hydra_configs/recipe/<name>.yaml).")
    p.add_argument("--timeout", type=float, default=None, help="Kill the run after this many seconds.")
    p.add_argument("overrides", nargs="*", help="Extra Hydra overrides, key=value.")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    result = run_cpu_recipe(Path(args.out), args.steps, args.recipe, args.overrides, args.timeout)
    if result.returncode != 0:
        print(f"[demo] main_ppo failed (exit {result.returncode}); last lines of {result.log}:", file=sys.stderr)
        print("\n".join(result.log.read_text(errors="replace").splitlines()[-25:]), file=sys.stderr)
        return result.returncode
    ckpts = result.checkpoints()
    if ckpts:
        adapter = ckpts[-1] / "actor" / "tinylora_adapter.safetensors"
        size = adapter.stat().st_size if adapter.is_file() else 0
        print(f"[demo] adapter: {adapter} ({size} bytes); plot: tinylora-verl plot {result.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
