"""`ray job submit` on CPU: recipes/ray_submit_cpu.sh starts a local head and runs the CPU recipe as a Ray job (the
session's shared job, ``tests/verl/conftest.py``), whose overrides and runtime env reach the job."""

import pytest

from tinylora_verl.core.adapter_io import read_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_ray_job_submission_trains_and_checkpoints(ray_job):
    proc, out, metrics = ray_job
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log and "preflight ok: 1 node(s)" in log, log[-4000:]
    adapter = out / "global_step_1" / "actor" / "tinylora_adapter.safetensors"
    v, meta = read_adapter(str(adapter))
    assert adapter.stat().st_size < 4096 and v.shape == (13, 1)
    # The overrides reached the job (its resolved config, printed by verl's driver) and so did the runtime env (the
    # file logger's path).
    assert "'init': 'normal'" in log and [r["step"] for r in metrics] == [1]
