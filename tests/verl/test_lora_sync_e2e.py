"""sync_mode=lora end to end on CPU: vLLM serves base + exact LoRA, on the same seeded adapter, prompts and seeds
as a merged run (the session's Ray job, ``tests/verl/conftest.py``), and the trainer/vLLM mismatch drops below the
merged mode's.

Both engines compute in float32 on SmolLM2's bf16-exact weights, so kernel and activation-precision noise is
~1e-6 and what is left of the mismatch is the delivery of ΔW: merged sends ``bf16(W + ΔW)`` (the recipe's
``sync_dtype``), lora sends the bf16 factors of ΔW alone. With both engines in bf16 (the CPU recipe as is) the
compute noise is ~10x larger and the two modes measured the same (probs_diff_mean 0.0073 vs 0.0073; README).
"""

import pytest

from tests.verl.conftest import FP32_ADAPTER_RUN
from tinylora_verl.apps.demo import run_cpu_recipe

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MISMATCH = ("training/rollout_probs_diff_mean", "rollout_corr/k3_kl", "rollout_corr/log_ppl_abs_diff")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_job):
    """The merged side is the session's Ray job (the same recipe and overrides, sync_mode merged)."""
    proc, _, merged = ray_job
    assert proc.returncode == 0 and len(merged) == 1, (proc.stdout + proc.stderr)[-5000:]
    res = run_cpu_recipe(tmp_path_factory.mktemp("sync") / "lora", steps=1, recipe="tinylora_gsm8k_cpu_lora",
                         overrides=[*FP32_ADAPTER_RUN, "trainer.save_freq=-1"], timeout=1200, echo=True)
    assert res.returncode == 0, res.log_text()[-5000:]
    assert len(res.metrics) == 1
    return {"lora": res, "metrics": {"merged": merged[0], "lora": res.metrics[0]}}


def test_lora_sync_serves_the_adapter_through_vllms_lora(runs):
    log = runs["lora"].log_text()
    assert "lora sync: 420 tensors (210 modules)" in log
    assert "tinylora_verl CPU weight sync: LoRA adapter, 420 tensors" in log
    lora, merged = runs["metrics"]["lora"], runs["metrics"]["merged"]
    # The adapter stream: 210 modules x (A, B) in bf16, against the whole merged model.
    assert lora["actor/tinylora/sync_bytes"] < merged["actor/tinylora/sync_bytes"] / 50
    assert abs(lora["actor/tinylora/merge_fidelity"] - 1) < 1e-2


def test_mismatch_drops_below_the_merged_modes(runs):
    lora, merged = runs["metrics"]["lora"], runs["metrics"]["merged"]
    for key in MISMATCH:
        print(f"{key}: merged {merged[key]:.3e}  lora {lora[key]:.3e}")
    # Measured (8 prompts x 4 samples): probs_diff_mean 1.02e-3 -> 8.9e-5, k3 KL 4.6e-5 -> 3.1e-7.
    assert lora["training/rollout_probs_diff_mean"] < 0.25 * merged["training/rollout_probs_diff_mean"]
    assert lora["rollout_corr/k3_kl"] < 0.1 * merged["rollout_corr/k3_kl"]
    assert lora["rollout_corr/log_ppl_abs_diff"] < 0.25 * merged["rollout_corr/log_ppl_abs_diff"]
    # The merged mode's mismatch is real but small: what vLLM serves is still the trainer's adapter.
    assert merged["rollout_corr/k3_kl"] < 1e-3
