"""The CPU study's plan, file layout, statistics wiring and report (the runs themselves are docs/cpu-study.md)."""

import csv
import json
import re
from pathlib import Path

import pytest

from tinylora_verl.apps import cpu_study
from tinylora_verl.apps.cpu_study import Arm, adapter_file, arms_for, data_overrides, sft_steps, summarize
from tinylora_verl.apps.stats import mcnemar_exact


def test_arms_are_grpo_at_two_budgets_and_sft_at_13():
    assert [a.name for a in arms_for(105)] == ["grpo13", "grpo105", "sft13"]
    with pytest.raises(ValueError, match=r"--budget 13 must be an int > 13"):
        arms_for(13)


def test_sft_sees_the_grpo_arms_problems_and_optimizer_steps():
    # GRPO: 8 prompts a step in two mini-batches; SFT: 4 examples a step.
    assert sft_steps(30) == 60 and sft_steps(30) * cpu_study.SFT_EXAMPLES_PER_STEP == 30 * 8


def test_adapter_files_follow_each_trainers_checkpoint_layout(tmp_path):
    assert adapter_file(tmp_path, Arm("grpo", 13), 30) == (
        tmp_path / "runs" / "grpo13" / "global_step_30" / "actor" / "tinylora_adapter.safetensors")
    assert adapter_file(tmp_path, Arm("sft", 13), 30) == (
        tmp_path / "runs" / "sft13" / "global_step_60" / "tinylora_adapter.safetensors")


def test_data_overrides_point_each_trainer_at_its_files(tmp_path):
    assert data_overrides(tmp_path, sft=False) == [f"data.train_files={tmp_path}/train.parquet",
                                                   f"data.val_files={tmp_path}/test.parquet"]
    assert data_overrides(tmp_path, sft=True) == [f"data.train_files={tmp_path}/sft_train.parquet",
                                                  f"data.val_files={tmp_path}/sft_val.parquet"]


def test_sft_command_runs_the_recipe_under_torchrun(tmp_path):
    cmd = cpu_study.sft_command(tmp_path / "run", 60, tmp_path, 13)
    assert Path(cmd[0]).name == "torchrun" and cmd[cmd.index("-m") + 1] == "verl.trainer.sft_trainer"
    assert "+recipe=tinylora_arithmetic_cpu_sft" in cmd and "trainer.total_training_steps=60" in cmd
    assert f"trainer.default_local_dir={tmp_path / 'run'}" in cmd and "tinylora.budget=13" in cmd


def _rows(mode, correct, decoding="greedy", test_set="seed0", first=0):
    return [{"test_set": test_set, "benchmark": "arithmetic", "decoding": decoding, "mode": mode, "index": i,
             "sample": 0, "correct": c, "formatted": True, "reward": float(c), "correct_lenient": c,
             "num_tokens": 10, "response": "x", "prompt": [{"role": "user", "content": f"What is {first + i} + 1?"}]}
            for i, c in enumerate(correct)]


def test_the_redraws_fresh_subset_leaves_out_problems_of_the_first_test_set():
    first = _rows("base", [True] * 4)  # problems 0..3
    redraw = _rows("base", [False] * 4, test_set="redraw1", first=2)  # problems 2..5: two shared
    rows = cpu_study.with_fresh_subset(first + redraw, "seed0", "redraw1")
    fresh = [r for r in rows if r["test_set"] == "redraw1_fresh"]
    assert [cpu_study.question_of(r) for r in fresh] == ["What is 4 + 1?", "What is 5 + 1?"]
    assert len(rows) == 8 + 2


def test_summarize_pairs_every_arm_with_the_base_on_the_same_problems():
    base = [True, False, False, True, False, False]
    arm = [True, True, True, False, False, True]
    summary, paired = summarize(_rows("base", base) + _rows("grpo13", arm) + _rows("base", base, test_set="redraw1"))
    assert {(s["test_set"], s["mode"]) for s in summary} == {("seed0", "base"), ("seed0", "grpo13"),
                                                             ("redraw1", "base")}
    (p,) = paired
    assert (p["test_set"], p["mode"], p["reference"]) == ("seed0", "grpo13", "base")
    assert p["diff"] == pytest.approx(2 / 6)
    # The exact McNemar test on the discordant pairs (3 solved only by the arm, 1 only by the base).
    assert (p["n01"], p["n10"]) == (3, 1)
    assert p["p_mcnemar"] == mcnemar_exact(dict(enumerate(base)), dict(enumerate(arm)))["p_mcnemar"] == 0.625


def test_report_writes_the_tables(tmp_path):
    summary, paired = summarize(_rows("base", [True, False] * 5) + _rows("sft13", [True, True] * 5))
    report = cpu_study.write_report(tmp_path, summary, paired, {"preset": "chain3", "seed": 0})
    text = report.read_text()
    assert "| seed0 | greedy | sft13 | 1.000 [1.000, 1.000] | 1.000 | +0.500 [" in text
    assert "| seed0 | greedy | base | 0.500 [" in text
    rows = list(csv.DictReader(open(tmp_path / "paired.csv")))
    assert rows[0]["mode"] == "sft13" and float(rows[0]["diff"]) == 0.5
    assert json.loads(text.split("```")[1])["preset"] == "chain3"


def test_dry_run_prints_the_plan(capsys, tmp_path):
    assert cpu_study.main(["--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "train sft13: tinylora_arithmetic_cpu_sft, 60 steps" in out
    assert "train grpo105: tinylora_arithmetic_cpu, 30 steps" in out
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("argv, match", [
    (["--redraw-seed", "0"], r"--redraw-seed must differ from --seed \(both 0\)"),
    (["--budget", "7"], r"--budget 7 must be an int > 13"),
    (["--test-size", "0"], r"need --steps >= 1, --test-size >= 1"),
])
def test_bad_arguments_are_refused(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit):
        cpu_study.main(["--out", str(tmp_path), "--dry-run", *argv])
    assert re.search(match, capsys.readouterr().err)
