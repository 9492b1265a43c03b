"""The metrics reader's handling of what verl's two trainers log."""

import json

import pytest

from tinylora_verl.apps.metrics import append_launch, read_metrics, scalar, v_values


def test_v_values_read_main_ppo_means_and_sft_trainer_lists(tmp_path):
    """main_ppo logs the reduced value (actor/ prefix); the SFT trainer logs the engine's per-rank list unreduced."""
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"step": 1, "data": {"actor/tinylora/v_1": 0.5, "actor/tinylora/v_0": -0.25}}) + "\n"
                    + json.dumps({"step": 2, "data": {"tinylora/v_0": [[0.125], [0.125]], "tinylora/v_1": [[1.0]],
                                                      "train/loss": 0.3}}) + "\n")
    rows = read_metrics(path)
    assert v_values(rows[0]) == [-0.25, 0.5]
    assert v_values(rows[1]) == [0.125, 1.0]


@pytest.mark.parametrize("value, expected", [(2, 2.0), ([1.0, 3.0], 2.0), ((0.5,), 0.5), ([[0.25]], 0.25), ([[1.0], [2.0, 3.0]], 2.0)])
def test_scalar(value, expected):
    assert scalar(value) == expected


def test_append_launch_moves_a_launchs_file_onto_the_run(tmp_path):
    run = tmp_path / "metrics.jsonl"
    run.write_text('{"step": 1, "data": {"a": 1}}\n')
    launch = tmp_path / "metrics.run1.jsonl"
    launch.write_text('{"step": 2, "data": {"a": 2}}\n')
    append_launch(launch, run)
    assert [r["step"] for r in read_metrics(run)] == [1, 2] and not launch.exists()
    append_launch(launch, run)  # a launch that logged nothing leaves the run as it was
    assert len(read_metrics(run)) == 2
