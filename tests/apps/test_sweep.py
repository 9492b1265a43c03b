"""The paper-sweep launcher: grid, commands, collection, resume; and a real one-run sweep on CPU through Ray (the local
backend's real run is in tests/verl/test_shipped_recipes_e2e.py)."""

import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_session

from tinylora_verl.apps import sweep
from tinylora_verl.apps.sweep import GSM8K_VAL_ACC, SweepRun

ROOT = Path(__file__).resolve().parents[2]


def write_metrics(path: Path, base: float, final: float):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"step": 0, "data": {GSM8K_VAL_ACC: base}}, {"step": 1, "data": {"critic/score/mean": 0.5}},
            {"step": 2, "data": {GSM8K_VAL_ACC: final, "critic/score/mean": 0.6}}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_default_grid_is_the_papers(capsys):
    assert sweep.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "147 runs of +recipe=tinylora_gsm8k: budgets [1, 13, 49, 196, 392, 6272, 100352] x 21" in out
    assert out.count("[sweep] plan ") == 147 and "plan b13_lr0.0001_s2: budget 13, lr 0.0001, seed 2" in out
    first = out.split("[sweep] first command: ")[1].split()
    assert first[1:4] == ["-m", "verl.trainer.main_ppo", "+recipe=tinylora_gsm8k"]
    assert "tinylora.budget=1" in first and "tinylora.lr=1e-07" in first and "trainer.logger=[console,file]" in first


@pytest.mark.parametrize("argv, msg", [
    (["--budgets", "13,0"], r"--budgets '13,0' must list distinct ints >= 1"),
    (["--budgets", "13,x"], r"--budgets '13,x' must be comma-separated ints"),
    (["--lrs", "1e-4,1e-4"], r"--lrs '1e-4,1e-4' must list distinct floats > 0"),
    (["--lrs", "0,1e-4"], r"--lrs '0,1e-4' must list distinct floats > 0"),
    (["--seeds", "-1"], r"--seeds '-1' must list distinct ints >= 0"),
    (["--backend", "ray"], r"--backend ray needs --address"),
    (["--nnodes", "0"], r"--nnodes must be >= 1, got 0"),
    (["trainer.nnodes"], r"overrides must look like key=value; got \['trainer.nnodes'\]"),
])
def test_bad_arguments(argv, msg, capsys):
    with pytest.raises(SystemExit):
        sweep.main([*argv, "--dry-run"])
    assert re.search(msg, capsys.readouterr().err)


def test_ray_command_quotes_words_and_chains_the_preflight():
    run = SweepRun(13, 1e-4, 0)
    cmd = sweep.ray_submit_command("ray", "http://head:8265", {"env_vars": {"A": "1"}}, "python3", 2, run,
                                   sweep.train_args("tinylora_gsm8k", run, Path("/shared/sweep"),
                                                    ["trainer.nnodes=2", "data.x='a b'"]))
    # What the job runs: Ray shell-quotes each word after "--" (shlex.join) and hands the line to a shell.
    line = shlex.join(cmd[cmd.index("--") + 1:])
    argv = shlex.split(line)
    assert argv[:2] == ["bash", "-c"]
    check, train = argv[2].split(" && ")
    assert shlex.split(check) == ["python3", "-m", "tinylora_verl.verl.cluster", "check", "--nodes", "2"]
    words = shlex.split(train)
    assert words[:3] == ["python3", "-m", "verl.trainer.main_ppo"]
    assert "trainer.logger=[console,file]" in words and words[-1] == "data.x='a b'"
    assert json.loads(cmd[cmd.index("--runtime-env-json") + 1]) == {"env_vars": {"A": "1"}}


def test_runtime_env_gets_the_metrics_path(tmp_path):
    env = sweep.load_runtime_env(str(ROOT / "recipes" / "runtime_env.yaml"), tmp_path / "m.jsonl")
    assert env["env_vars"]["VERL_FILE_LOGGER_PATH"] == str(tmp_path / "m.jsonl")
    assert env["env_vars"]["HYDRA_FULL_ERROR"] == "1"


def test_collect_picks_best_lr_by_seed_mean(tmp_path):
    grid = sweep.build_grid([1, 13], [1e-5, 1e-4], [0, 1])
    finals = {(1, 1e-5): [0.70, 0.74], (1, 1e-4): [0.80, 0.60], (13, 1e-5): [0.80, 0.82], (13, 1e-4): [0.90, 0.86]}
    for run in grid:
        write_metrics(sweep.metrics_path(tmp_path, run), 0.76, finals[(run.budget, run.lr)][run.seed])
    # A run that never logged the metric counts for nothing.
    best = sweep.collect(tmp_path, grid + [SweepRun(49, 1e-4, 0)])
    assert [(b["budget"], b["best_lr"], b["seeds"]) for b in best] == [(1, 1e-5, 2), (13, 1e-4, 2)]
    assert best[1]["mean"] == pytest.approx(0.88) and best[1]["std"] == pytest.approx(0.0282842712)
    with open(tmp_path / "best_lr.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["best_lr"] == "1e-05" and json.loads(rows[0]["per_lr_means"]) == {"1e-05": 0.72, "0.0001": 0.7}
    with open(tmp_path / "runs.csv") as fh:
        runs = list(csv.DictReader(fh))
    assert len(runs) == 9 and runs[-1]["final"] == "" and runs[0]["step0"] == "0.76"
    assert (tmp_path / "figure1.png").read_bytes()[:4] == b"\x89PNG"


def test_launch_skips_finished_runs_and_reports_failures(tmp_path, capsys):
    grid = sweep.build_grid([13], [1e-4], [0, 1])
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / grid[0].name).write_text("{}")
    # The second run really starts main_ppo, with a recipe that does not exist: verl's driver guard stops it.
    failed = sweep.launch(tmp_path, grid, "tinylora_nope", [], "local")
    assert failed == [grid[1]]
    out = capsys.readouterr().out
    assert "1/2 b13_lr0.0001_s0: done before, skipped" in out and "2/2 b13_lr0.0001_s1: exit 1" in out
    assert "unknown recipe 'tinylora_nope'" in (tmp_path / "logs" / f"{grid[1].name}.log").read_text()
    assert not (tmp_path / "done" / grid[1].name).exists()


# ------------------------------------------------------------------------------------------ real CPU sweeps

# One step at the CPU overlay's sizes (the learning recipe's study sizes are larger), validated before and after.
CPU_RUN = ["--budgets", "13", "--lrs", "0.02", "--seeds", "0",
           "trainer.total_training_steps=1", "trainer.save_freq=-1", "trainer.test_freq=1",
           "trainer.val_before_train=true", "data.val_max_samples=8", "actor_rollout_ref.rollout.seed=0",
           "data.train_batch_size=4", "data.max_response_length=128", "actor_rollout_ref.actor.ppo_mini_batch_size=1"]


def check_collected(out: Path, proc: subprocess.CompletedProcess):
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    rows = [json.loads(line) for line in (out / "metrics" / "b13_lr0.02_s0.jsonl").read_text().splitlines()]
    vals = [(r["step"], r["data"][GSM8K_VAL_ACC]) for r in rows if GSM8K_VAL_ACC in r["data"]]
    assert [s for s, _ in vals] == [0, 1], vals
    with open(out / "best_lr.csv") as fh:
        best = list(csv.DictReader(fh))
    assert len(best) == 1 and best[0]["budget"] == "13" and best[0]["best_lr"] == "0.02"
    assert float(best[0]["mean"]) == pytest.approx(vals[-1][1])
    assert (out / "figure1.png").is_file() and (out / "done" / "b13_lr0.02_s0").is_file()


# The Ray backend runs the learning recipe of docs/cpu-learning.md, cut to one step; the local backend's real run is the
# paper recipe's CPU run:
# tests/verl/test_shipped_recipes_e2e.py::test_paper_gsm8k_recipe_sweeps_on_the_cpu_overlay.


@pytest.fixture
def ray_head():
    """A private Ray head with a job server, like recipes/ray_submit_cpu.sh starts (never `ray stop`)."""
    ray = str(Path(sys.executable).parent / "ray")
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_TMPDIR="/tmp/ray_sweep_test")
    head = subprocess.Popen([ray, "start", "--head", "--block", "--num-cpus", "16", "--num-gpus", "1",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", "8267", "--disable-usage-stats",
                             "--temp-dir", "/tmp/ray_sweep_test"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            if subprocess.run([ray, "job", "list", "--address", "http://127.0.0.1:8267"], env=env,
                              capture_output=True).returncode == 0:
                break
            assert head.poll() is None, "ray head exited"
            time.sleep(1)
        yield ray, env
    finally:
        head.terminate()
        head.wait(timeout=120)


@pytest.mark.e2e
@pytest.mark.slow
def test_ray_sweep_submits_jobs_and_collects(tmp_path, ray_head):
    ray, env = ray_head
    out = tmp_path / "sweep"
    proc = run_session([sys.executable, "-m", "tinylora_verl.apps.sweep", "--out", str(out), "--backend", "ray",
                        "--address", "http://127.0.0.1:8267", "--ray", ray, "--python", sys.executable,
                        "--runtime-env", str(ROOT / "recipes" / "runtime_env.yaml"), "--recipe",
                        "tinylora_gsm8k_cpu_learn", *CPU_RUN,
                        "ray_kwargs.ray_init.num_cpus=null", "ray_kwargs.ray_init.num_gpus=null"], timeout=1800,
                       env=env)
    check_collected(out, proc)
    log = (out / "logs" / "b13_lr0.02_s0.log").read_text()
    assert "preflight ok: 1 node(s)" in log and "succeeded" in log
