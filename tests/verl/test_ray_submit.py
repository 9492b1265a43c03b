"""`ray job submit` on CPU: recipes/ray_submit_cpu.sh starts a local head and runs the CPU recipe as a Ray job."""

import os
import sys
from pathlib import Path

import pytest

from tests.conftest import run_session
from tinylora_verl.core.adapter_io import read_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "recipes" / "ray_submit_cpu.sh"


def test_ray_job_submission_trains_and_checkpoints(tmp_path):
    out = tmp_path / "job"
    # A short RAY_TMPDIR: Ray puts Unix sockets under it, and pytest paths overflow the 107-byte limit.
    env = dict(os.environ, PY=sys.executable, STEPS="1", OUT=str(out), RAY_DASHBOARD_PORT="8266",
               RAY_TMPDIR="/tmp/ray_submit_test")
    proc = run_session(["bash", str(SCRIPT), "trainer.save_freq=1", "actor_rollout_ref.rollout.seed=0"], env=env,
                       timeout=1800)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log, log[-4000:]
    adapter = out / "global_step_1" / "actor" / "tinylora_adapter.safetensors"
    v, meta = read_adapter(str(adapter))
    assert adapter.stat().st_size < 4096 and v.shape == (13, 1)
