"""The GPU commands of the README, run for real on a 4-GPU node (skipped on machines without CUDA)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinylora_verl.core.adapter_io import read_adapter

pytestmark = [pytest.mark.gpu(4), pytest.mark.e2e, pytest.mark.slow]


def test_paper_recipe_runs_two_steps_on_four_gpus(tmp_path):
    """`python -m verl.trainer.main_ppo +recipe=tinylora_gsm8k`, shortened to 2 steps: v moves, adapter saved."""
    data = Path.home() / "data" / "gsm8k"
    if not (data / "train.parquet").is_file():
        subprocess.run([sys.executable, "-m", "tinylora_verl.apps.cli", "data", "gsm8k", "--out-dir", str(data)], check=True)
    metrics = tmp_path / "metrics.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", "+recipe=tinylora_gsm8k", "trainer.total_training_steps=2",
         "trainer.save_freq=2", "trainer.test_freq=-1", "trainer.val_before_train=false",
         "trainer.logger=[console,file]", f"trainer.default_local_dir={tmp_path / 'run'}"],
        env=dict(os.environ, VERL_FILE_LOGGER_PATH=str(metrics)), capture_output=True, text=True, timeout=7200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    rows = [json.loads(line)["data"] for line in metrics.read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["actor/tinylora/v_norm"] > 0
    v, meta = read_adapter(str(tmp_path / "run" / "global_step_2" / "actor" / "tinylora_adapter.safetensors"))
    assert v.numel() == 13
