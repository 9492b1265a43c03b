"""End to end on CPU: verl's unchanged main_ppo, vLLM CPU rollout, SmolLM2, 13 TinyLoRA parameters.

Runs the `tinylora_gsm8k_cpu` recipe with ``tinylora.sync_mode=native`` (vLLM computes the update from v alone;
merged mode, the default, runs in the shipped-recipe and sweep tests) toward 3 GRPO steps and kills it (SIGKILL, the whole process session, as a
crash or a pre-empted node would) once the step-2 checkpoint is complete, then resumes it from that checkpoint for
step 3, and checks what the run left behind: metrics, the adapter file, the dumped rollouts and their rewards, and
that each process installed the factors once and then sent only v (the restart reinstalls).
"""

import json

import pytest
import torch

from tinylora_verl.core.adapter_io import read_adapter
from tinylora_verl.apps.demo import RunResult, run_cpu_recipe
from tinylora_verl.apps.metrics import read_metrics, v_values
from tinylora_verl.tasks.rewards import compute_score

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# A fixed engine seed: vLLM CPU samples deterministically given the seed and the weights.
OVERRIDES = ["actor_rollout_ref.rollout.seed=0", "data.seed=0", "tinylora.sync_mode=native"]


def checkpointed(out) -> int:
    tracker = out / "latest_checkpointed_iteration.txt"
    return int(tracker.read_text()) if tracker.is_file() else 0


def step_done(out, step: int) -> bool:
    """Step ``step`` is checkpointed and its metrics row is written (verl logs a step after saving it, so a kill
    between the two would lose the row, not the step)."""
    return checkpointed(out) >= step and any(
        row["step"] == step for path in out.glob("metrics.run*.jsonl") for row in read_metrics(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[RunResult, RunResult]:
    out = tmp_path_factory.mktemp("e2e") / "run"
    first = run_cpu_recipe(out, steps=3, overrides=OVERRIDES, timeout=1800, echo=True,
                           kill_when=lambda: step_done(out, 2))
    assert first.returncode == -9 and checkpointed(out) == 2, first.log.read_text()[-5000:]
    second = run_cpu_recipe(out, steps=3, overrides=OVERRIDES, timeout=1200, echo=True)
    assert second.returncode == 0, second.log.read_text()[-5000:]
    return first, second


def test_two_grpo_steps_move_v(runs):
    first, _ = runs
    assert [r["step"] for r in first.metrics] == [1, 2]
    v = [v_values(r) for r in first.metrics]
    assert all(len(x) == 13 for x in v)
    assert any(abs(x) > 0 for x in v[-1]), "v never left its zero init: no group had reward variance"


def test_rollout_correction_and_mismatch_metrics_are_logged(runs):
    first, _ = runs
    for row in first.metrics:
        for key in ("rollout_corr/rollout_is_mean", "rollout_corr/kl", "training/rollout_probs_diff_mean",
                    "actor/tinylora/merge_fidelity", "actor/tinylora/sync_bytes"):
            assert key in row, key
        assert 0.5 < row["rollout_corr/rollout_is_mean"] < 2.0
        assert row["training/rollout_probs_diff_mean"] < 0.05


def test_rewards_are_the_gsm8k_rule(runs):
    first, _ = runs
    dumps = sorted((first.run_dir / "rollouts").glob("*.jsonl"))
    assert len(dumps) >= 2
    rows = [json.loads(line) for d in dumps for line in d.read_text().splitlines()]
    assert len(rows) >= 2 * 4 * 4
    for row in rows:
        expected = compute_score("openai/gsm8k", row["output"], row["gts"], format_score=0.1)
        assert row["score"] == pytest.approx(expected), row["output"][-200:]


def test_checkpoint_is_a_few_bytes_of_adapter(runs):
    first, _ = runs
    ckpt = first.run_dir / "global_step_2" / "actor"
    adapter = ckpt / "tinylora_adapter.safetensors"
    assert adapter.stat().st_size < 4096
    v, meta = read_adapter(str(adapter))
    assert v.shape == (13, 1) and meta["config"]["r"] == 2
    torch.testing.assert_close(v.reshape(-1), torch.tensor(v_values(first.metrics[-1])), rtol=0, atol=1e-6)
    assert not list(ckpt.glob("model_world_size_*")), "frozen weights must not be checkpointed"


def test_resume_runs_step_3_from_the_checkpoint(runs):
    first, second = runs
    assert [r["step"] for r in second.metrics] == [3]
    saved, _ = read_adapter(str(first.run_dir / "global_step_2" / "actor" / "tinylora_adapter.safetensors"))
    # The resumed run's first sync (before step 3's rollout) must carry the checkpoint's v (bit-exact restore is
    # tested in test_engine).
    shown = [round(x, 6) for x in saved.reshape(-1).tolist()]
    syncs = [line for line in second.log_text().splitlines() if "[tinylora] native sync:" in line]
    assert syncs and f"v={shown}" in syncs[0], (shown, syncs[:1])


def test_native_sync_installs_once_per_process_then_sends_60_bytes(runs):
    first, second = runs
    log = second.log.read_text()  # the whole log: the killed run's lines, then the resumed run's
    syncs = [line for line in log.splitlines() if "[tinylora] native sync:" in line]
    installs = [i for i, line in enumerate(syncs) if "base + install" in line]
    # One install per engine life: the first sync of the killed run and the first of the resumed one (the killed
    # run may have synced for step 3 before the kill).
    assert len(installs) == 2 and installs[0] == 0 and installs[1] >= len(first.metrics), syncs
    assert all("60 bytes of v + checksum" in line for line in syncs)
    assert log.count("[tinylora] native install: 210 modules into 120 vLLM layers") == 2
    assert log.count("(matches the trainer's), 60 bytes") >= len(syncs)
    # A row reports the sync before its step's rollout: the first of each process carries base + install.
    sent = [[row["actor/tinylora/sync_bytes"] for row in run.metrics] for run in runs]
    assert sent[0][0] > 1e6 and sent[0][1:] == [60] * (len(sent[0]) - 1) and sent[1][0] > 1e6, sent


def test_native_rollout_mismatch_does_not_grow_once_v_moves(runs):
    """Step 1 rolls out at v = 0; later steps at the trained v: vLLM must still score like the trainer."""
    first, second = runs
    kl = [row["rollout_corr/k3_kl"] for row in first.metrics + second.metrics]
    diff = [row["training/rollout_probs_diff_mean"] for row in first.metrics + second.metrics]
    print("k3 KL per step", kl, "probs diff", diff)
    # Tolerance: the steps score different prompts, so float32 kernel noise varies by a few times between them.
    assert all(k <= 4 * kl[0] + 1e-5 for k in kl[1:]), kl
    assert all(d <= 4 * diff[0] + 1e-4 for d in diff[1:]), diff
