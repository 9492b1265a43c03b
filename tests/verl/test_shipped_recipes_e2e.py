"""The shipped GPU recipes, run as a user runs them, with only the hardware swapped (``+hardware=cpu``).

HOME points at a temporary folder; the data is written there by the README's own command, run through a shell so
``~`` is the shell's; then ``python -m verl.trainer.main_ppo +recipe=NAME +hardware=cpu`` reads it through the
recipe's own data paths and verl's dataset loading, scores with the recipe's reward function, and takes one GRPO
step to a checkpoint. With the recipes' former ``~/data/...`` paths this fails: verl hands the string to
``datasets.load_dataset`` unexpanded. The GSM8K recipe runs through the paper-sweep launcher (local backend: the same
``main_ppo`` command plus the sweep's overrides), so that one launch also tests the sweep's run, validation and
collection.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.apps.test_sweep import CPU_RUN, check_collected
from tests.conftest import run_session
from tinylora_verl.apps.demo import run_cpu_recipe
from tinylora_verl.apps.metrics import read_metrics, v_values
from tinylora_verl.apps.models import default_cache_dir
from tinylora_verl.core.adapter_io import read_adapter
from tinylora_verl.tasks.data import MATH_DATA_SOURCE
from tinylora_verl.tasks.rewards import compute_score

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# Small MATH-style problems with boxed solutions (written here; the MATH dataset is not on this machine).
MATH_PROBLEMS = [
    (f"What is ${a} + {b} \\times {c}$?", f"Multiply first: ${b} \\times {c} = {b * c}$, so the sum is "
     f"$\\boxed{{{a + b * c}}}$.") for a, b, c in [(3, 4, 5), (7, 2, 9), (12, 3, 3), (5, 6, 7), (9, 8, 2), (4, 4, 4),
                                                   (10, 5, 3), (2, 9, 6), (8, 7, 1), (6, 3, 8), (11, 2, 2), (1, 5, 9)]
]


def shell(command: str, env: dict) -> None:
    """Run a README command through bash, with this venv's scripts on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    out = subprocess.run(["bash", "-c", command], env=dict(env, PATH=path), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"{command}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh HOME holding ~/data/gsm8k and ~/data/math, written by the README's commands."""
    from torch.utils import cpp_extension

    home = tmp_path_factory.mktemp("home")
    # The CPU kernels' build and the converted model stay where they are (not part of what is tested).
    env = dict(os.environ, HOME=str(home),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    shell("tinylora-verl data gsm8k --out-dir ~/data/gsm8k", env)
    problems = home / "math_problems.jsonl"
    problems.write_text("".join(json.dumps({"problem": p, "solution": s}) + "\n" for p, s in MATH_PROBLEMS))
    for split in ("train", "test"):
        shell(f"tinylora-verl data math --jsonl ~/math_problems.jsonl --out ~/data/math/{split}.parquet "
              f"--split {split}", env)
    assert (home / "data" / "gsm8k" / "train.parquet").is_file() and (home / "data" / "math" / "test.parquet").is_file()
    return env


def run_shipped(recipe: str, env: dict, out: Path, *extra: str):
    cache = str(default_cache_dir())  # resolved with the real HOME: the converted SmolLM2
    result = run_cpu_recipe(out, steps=1, recipe=recipe, timeout=1500, env=dict(env, TINYLORA_VERL_CACHE=cache),
                            overrides=["+hardware=cpu", f"trainer.rollout_data_dir={out / 'rollouts'}",
                                       "actor_rollout_ref.rollout.seed=0", *extra])
    assert result.returncode == 0, result.log_text()[-6000:]
    return result


def rollouts(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "rollouts").glob("*.jsonl")) for line in f.read_text().splitlines()]


def check_run(log: str, metrics: list[dict], run_dir: Path, home: str, folder: str) -> None:
    assert f"{home}/data/{folder}/train.parquet" in log, "the run did not read the recipe's own data path"
    assert [r["step"] for r in metrics] == [1]
    assert "actor/tinylora/v_norm" in metrics[0]
    v, meta = read_adapter(str(run_dir / "global_step_1" / "actor" / "tinylora_adapter.safetensors"))
    assert v.shape == (13, 1) and meta["config"]["tie_mode"] == "tiled"


def test_paper_gsm8k_recipe_sweeps_on_the_cpu_overlay(home, tmp_path):
    """A one-run local sweep of the paper's recipe (the sweep launcher runs ``main_ppo +recipe=tinylora_gsm8k``
    with the user's overrides): validated before and after the step, checkpointed, collected into best_lr.csv."""
    out = tmp_path / "sweep"
    env = dict(home, TINYLORA_VERL_CACHE=str(default_cache_dir()))
    proc = run_session([sys.executable, "-m", "tinylora_verl.apps.sweep", "--out", str(out),
                        "--recipe", "tinylora_gsm8k", *(o for o in CPU_RUN if not o.startswith("trainer.save_freq")),
                        "+hardware=cpu", "trainer.save_freq=1",
                        f"trainer.rollout_data_dir={out / 'rollouts'}"], timeout=1800, env=env)
    check_collected(out, proc)
    run = out / "runs" / "b13_lr0.02_s0"
    log = (out / "logs" / "b13_lr0.02_s0.log").read_text()
    rows = [r for r in read_metrics(out / "metrics" / "b13_lr0.02_s0.jsonl") if "actor/tinylora/v_norm" in r]
    check_run(log, rows, run, home["HOME"], "gsm8k")
    rows = rollouts(out)
    assert len(rows) == 4 * 4
    answers = {json.loads(line)["answer"].split("####")[-1].strip().replace(",", "")
               for line in (ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl").read_text().splitlines()}
    for row in rows:
        assert row["gts"] in answers, row["gts"]
        # The paper's exact-match rule: no format score.
        assert row["score"] == pytest.approx(compute_score("openai/gsm8k", row["output"], row["gts"]))


def test_paper_math_recipe_runs_on_the_cpu_overlay(home, tmp_path):
    # The overlay's four prompts x the recipe's 8 samples.
    result = run_shipped("tinylora_math", home, tmp_path / "math")
    check_run(result.log_text(), result.metrics, result.run_dir, home["HOME"], "math")
    assert "actor/kl_loss" in result.metrics[0], "the MATH recipe's KL to the actor-without-v reference is off"
    rows = rollouts(tmp_path / "math")
    assert len(rows) == 4 * 8
    answers = {str(a + b * c) for a, b, c in [(3, 4, 5), (7, 2, 9), (12, 3, 3), (5, 6, 7), (9, 8, 2), (4, 4, 4),
                                              (10, 5, 3), (2, 9, 6), (8, 7, 1), (6, 3, 8), (11, 2, 2), (1, 5, 9)]}
    for row in rows:
        assert row["gts"] in answers, row["gts"]
        # verl's rollout dump has no data_source column; the data were written with the MATH default.
        assert float(row["score"]) == pytest.approx(compute_score(MATH_DATA_SOURCE, row["output"], row["gts"],
                                                                  method="boxed"))


def test_sft_recipe_trains_v_through_verls_sft_trainer_on_the_cpu_overlay(home, tmp_path):
    """The SFT baseline as a user launches it (torchrun, verl's SFT trainer, the recipe's data path written by the
    README's command), on the CPU overlay: two optimizer steps through TinyLoRA's engine, an adapter file per step
    in the checkpoint, v different after each step, the loss logged."""
    shell("tinylora-verl data gsm8k --sft --out-dir ~/data/gsm8k_sft", home)
    runs = tmp_path / "runs"
    env = dict(home, TINYLORA_VERL_CACHE=str(default_cache_dir()), TINYLORA_VERL_RUNS=str(runs),
               VERL_FILE_LOGGER_PATH=str(tmp_path / "metrics.jsonl"))
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = run_session([str(torchrun), "--standalone", "--nproc_per_node=1", "-m", "verl.trainer.sft_trainer",
                        "+recipe=tinylora_gsm8k_sft", "+hardware=cpu_sft", "trainer.total_training_steps=2",
                        "trainer.save_freq=1", "trainer.logger=[console,file]"], timeout=900, env=env, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    # verl prints the config unresolved; the row counts show the recipe's path (${HOME}/data/gsm8k_sft) was read.
    assert "'train_files': '${oc.env:HOME}/data/gsm8k_sft/train.parquet'" in log
    assert "dataset len: 7473\ndataset len: 1319\n" in log
    assert "injected into 210 modules: 13 trainable" in log
    losses = [float(x) for x in re.findall(r"train/loss:([0-9.]+)", log)]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses), losses
    assert "selected 16 random samples out of 1319" in log and "val/loss:" in log
    run = runs / "gsm8k_sft_qwen2.5-7b_tinylora_13_lr0.0001"
    v1, meta = read_adapter(str(run / "global_step_1" / "tinylora_adapter.safetensors"))
    v2, _ = read_adapter(str(run / "global_step_2" / "tinylora_adapter.safetensors"))
    assert v1.shape == (13, 1) and meta["config"]["tie_mode"] == "tiled" and meta["config"]["budget"] == 13
    # Adam's first step moves every scalar with a non-zero gradient by about lr.
    assert bool((v1 != 0).any()) and bool((v2 != v1).any())
    assert float(v2.abs().max()) < 3e-4
    # The engine logs v each step; the SFT trainer writes it unreduced (a list per rank), which v_values reads.
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    logged = [v_values(r) for r in rows if v_values(r)]
    assert len(logged) == 2
    torch.testing.assert_close(torch.tensor(logged[-1]), v2.reshape(-1), rtol=0, atol=0)
