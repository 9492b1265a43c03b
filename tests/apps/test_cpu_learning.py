"""The CPU learning study driver: sweep selection, rollout statistics, report and resume logic (no verl run)."""

import csv
import json
from pathlib import Path

import pytest

import tinylora_verl.apps.cpu_learning as cl
from tinylora_verl.apps.demo import RunResult


def fake_run(run: Path, rewards, v_scale=0.01, scores=None, start=1):
    """What a finished main_ppo run leaves: metrics.jsonl rows and one rollout dump per step."""
    (run / "rollouts").mkdir(parents=True, exist_ok=True)
    with open(run / "metrics.jsonl", "a") as fh:
        for i, r in enumerate(rewards, start=start):
            data = {cl.SCORE_KEY: r} | {f"actor/tinylora/v_{k}": v_scale * i * (-1) ** k for k in range(13)}
            fh.write(json.dumps({"step": i, "data": data}) + "\n")
            step_scores = scores or [1.0, 0.10000000149011612, 0.0, 0.0]
            (run / "rollouts" / f"{i}.jsonl").write_text(
                "\n".join(json.dumps({"score": s, "step": i}) for s in step_scores) + "\n")


@pytest.mark.parametrize("text, expected", [("0.003,0.01,0.03", [0.003, 0.01, 0.03]), (" 1e-2 ", [0.01])])
def test_parse_lrs(text, expected):
    assert cl.parse_lrs(text) == expected


@pytest.mark.parametrize("text, msg", [
    ("0.01,abc", r"--lrs '0.01,abc' must be comma-separated floats"),
    ("0.01,0.01", r"--lrs '0.01,0.01' must list distinct floats > 0"),
    ("0,0.1", r"must list distinct floats > 0"),
    ("-1e-3", r"must list distinct floats > 0"),
    (" , ", r"must list distinct floats > 0"),
])
def test_parse_lrs_errors(text, msg):
    with pytest.raises(ValueError, match=msg):
        cl.parse_lrs(text)


@pytest.mark.parametrize("rewards, best", [
    ({0.003: [0.1, 0.1], 0.01: [0.1, 0.3], 0.03: [0.0, 0.2]}, 0.01),
    # Only the steps every run finished count: 0.03's late spike is outside the paired window.
    ({0.003: [0.2, 0.2], 0.03: [0.1, 0.1, 0.9]}, 0.003),
    # A tie goes to the smaller rate.
    ({0.01: [0.1, 0.2], 0.003: [0.2, 0.1]}, 0.003),
])
def test_select_lr(rewards, best):
    assert cl.select_lr(rewards) == best


def test_select_lr_needs_steps():
    with pytest.raises(ValueError, match=r"needs at least one logged step; got steps per rate \{0.01: 0"):
        cl.select_lr({0.01: [], 0.03: [0.1]})


def test_rollout_stats_counts_exact_and_formatted(tmp_path):
    fake_run(tmp_path, [0.2, 0.3], scores=[1.0, 0.10000000149011612, 0.10000000149011612, 0.0, 0.0])
    stats = cl.rollout_stats(tmp_path)
    assert stats == {1: {"acc": 0.2, "format_rate": 0.6, "n": 5}, 2: {"acc": 0.2, "format_rate": 0.6, "n": 5}}


def test_write_report_and_plot(tmp_path):
    for lr, rewards in [(0.003, [0.1] * 3), (0.01, [0.2] * 3)]:
        fake_run(cl.run_dir(tmp_path, lr), rewards)
    (tmp_path / "eval").mkdir()
    row = {"mode": "merged", "decoding": "greedy", "problems": 2, "responses": 2, "acc": 0.5, "acc_lenient": 0.5,
           "format_rate": 1.0, "mean_reward": 0.55}
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"rows": [row]}))
    (tmp_path / "eval" / "summary.csv").write_text("mode\nmerged\n")
    report = cl.write_report(tmp_path, [0.003, 0.01], 0.01, 3).read_text()
    assert "| 0.01 (selected) | 3 | 0.200 | 0.500 | 0.250 | 0.030 |" in report
    assert "| merged | greedy | 2 | 2 | 0.500 | 0.500 | 1.000 | 0.550 |" in report
    with open(tmp_path / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["selected"] for r in rows] == ["False", "True"] and rows[0]["mean_reward"] == "0.1000"
    png = cl.plot_curves({"a": cl.run_dir(tmp_path, 0.003), "b": cl.run_dir(tmp_path, 0.01)},
                         cl.run_dir(tmp_path, 0.01), tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dry_run_prints_plan_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cl, "run_cpu_recipe", lambda *a, **k: pytest.fail("dry run launched a run"))
    assert cl.main(["--out", str(tmp_path), "--lrs", "0.01,0.03", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"sweep: tinylora_gsm8k_cpu_learn x lr 0.03, 10 steps -> {tmp_path}/sweep/lr0.03" in out
    assert "eval: 128 GSM8K test problems, greedy + 4 samples" in out


@pytest.mark.parametrize("argv, msg", [
    (["--lrs", "x"], r"--lrs 'x' must be comma-separated floats"),
    (["--sweep-steps", "50"], r"need 1 <= --sweep-steps <= --steps, got --sweep-steps 50 --steps 40"),
])
def test_bad_arguments(argv, msg, capsys):
    with pytest.raises(SystemExit):
        cl.main(argv + ["--dry-run"])
    assert msg in capsys.readouterr().err


def test_study_resumes_and_continues_the_winner(tmp_path, monkeypatch, capsys):
    """Finished sweep runs are not rerun; the winner resumes to --steps; the eval gets the final adapter."""
    fake_run(cl.run_dir(tmp_path, 0.003), [0.1, 0.1])
    calls, evals = [], []

    def fake_recipe(run, steps, recipe, overrides):
        done = len(cl.read_metrics(run / "metrics.jsonl"))
        calls.append((run.name, steps, done, list(overrides)))
        fake_run(run, [0.3 if "0.03" in run.name else 0.05] * (steps - done), start=done + 1)
        return RunResult(0, run, run / "main_ppo.log")

    def fake_eval(cmd, check):
        evals.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps({"rows": []}))
        (out / "summary.csv").write_text("")

    monkeypatch.setattr(cl, "run_cpu_recipe", fake_recipe)
    monkeypatch.setattr(cl, "prepare_smollm2", lambda: Path("/model"))
    monkeypatch.setattr(cl.subprocess, "run", fake_eval)
    assert cl.main(["--out", str(tmp_path), "--lrs", "0.003,0.03", "--sweep-steps", "2", "--steps", "5"]) == 0
    assert calls == [("lr0.03", 2, 0, ["tinylora.lr=0.03"]), ("lr0.03", 5, 2, ["tinylora.lr=0.03"])]
    cmd = evals[0]
    assert cmd[cmd.index("--adapter") + 1].endswith("sweep/lr0.03/global_step_5/actor/tinylora_adapter.safetensors")
    assert cmd[cmd.index("--prompt-style") + 1] == "oneshot" and "--with-base" in cmd
    assert "selected lr=0.03" in capsys.readouterr().out
    # A second invocation finds everything done and launches nothing.
    calls.clear()
    evals.clear()
    assert cl.main(["--out", str(tmp_path), "--lrs", "0.003,0.03", "--sweep-steps", "2", "--steps", "5"]) == 0
    assert calls == [] and evals == []
