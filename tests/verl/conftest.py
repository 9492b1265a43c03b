"""A Ray job two test modules share: ``recipes/ray_submit_cpu.sh`` runs the CPU recipe as a Ray job, in float32 with
a seeded non-zero v, for one GRPO step to a checkpoint. ``test_ray_submit`` checks the submission and the checkpoint;
``test_lora_sync_e2e`` uses its metrics as the merged mode's side of the merged-vs-lora comparison (one main_ppo
launch fewer in the suite)."""

import os
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_session
from tinylora_verl.apps.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "recipes" / "ray_submit_cpu.sh"

# v starts from a seeded N(0, 0.1²), so the first rollout already serves a real ΔW; float32 trainer (no autocast)
# and rollout; micro-batches of 2 keep float32 logits within this machine's memory. The lora side of the comparison
# runs the same overrides with sync_mode lora.
FP32_ADAPTER_RUN = [
    "actor_rollout_ref.rollout.seed=0", "data.seed=0",
    "actor_rollout_ref.model.lora.tinylora.init=normal", "+actor_rollout_ref.model.lora.tinylora.init_std=0.1",
    "actor_rollout_ref.actor.fsdp_config.model_dtype=fp32",
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
    "actor_rollout_ref.rollout.dtype=float32", "data.train_batch_size=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2"]


@pytest.fixture(scope="session")
def ray_job(tmp_path_factory):
    """``(completed process, output folder, metrics rows)`` of the Ray job (merged sync, the recipe's default)."""
    work = tmp_path_factory.mktemp("ray_job")
    out, metrics = work / "job", work / "metrics.jsonl"
    # The job's environment comes from the runtime env (ray_submit.sh's RUNTIME_ENV): the shipped one plus where
    # verl's file logger writes.
    runtime_env = yaml.safe_load((ROOT / "recipes" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "VERL_FILE_LOGGER_PATH": str(metrics)}
    (work / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    # A short RAY_TMPDIR: Ray puts Unix sockets under it, and pytest paths overflow the 107-byte limit.
    env = dict(os.environ, PY=sys.executable, STEPS="1", OUT=str(out), RAY_DASHBOARD_PORT="8266",
               RAY_TMPDIR="/tmp/ray_submit_test", RUNTIME_ENV=str(work / "runtime_env.yaml"))
    proc = run_session(["bash", str(SCRIPT), *FP32_ADAPTER_RUN, "trainer.save_freq=1", "trainer.logger=[console,file]"],
                       env=env, timeout=1800)
    return proc, out, read_metrics(metrics)
