"""sync_mode=lora end to end on CPU: vLLM serves base + exact LoRA, on the same seeded adapter, prompts and seeds
as a merged run, and both modes' trainer/vLLM mismatch is measured.

At |v| ~ 0.1 with vLLM in bf16 the two modes' mismatch differ by less than run-to-run noise (two runs here:
probs_diff_mean -7% and +4% for lora), so this test does not claim a drop; issue 7 keeps that open."""

import pytest

from tinylora_verl.demo import run_cpu_recipe

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# v starts from a seeded N(0, 0.1²) (the same in both modes), so the first rollout already serves a real ΔW.
OVERRIDES = ["actor_rollout_ref.rollout.seed=0", "data.seed=0", "trainer.save_freq=-1",
             "actor_rollout_ref.model.lora.tinylora.init=normal", "+actor_rollout_ref.model.lora.tinylora.init_std=0.1"]
MISMATCH = ("training/rollout_probs_diff_mean", "rollout_corr/k3_kl", "rollout_corr/log_ppl_abs_diff")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync")
    results = {}
    for mode, recipe in (("merged", "tinylora_gsm8k_cpu"), ("lora", "tinylora_gsm8k_cpu_lora")):
        res = run_cpu_recipe(out / mode, steps=1, recipe=recipe, overrides=OVERRIDES, timeout=900, echo=True)
        assert res.returncode == 0, res.log_text()[-5000:]
        assert len(res.metrics) == 1
        results[mode] = res
    return results


def test_lora_sync_serves_the_adapter_through_vllms_lora(runs):
    log = runs["lora"].log_text()
    assert "lora sync: 420 tensors (210 modules)" in log
    assert "tinylora_verl CPU weight sync: LoRA adapter, 420 tensors" in log
    lora, merged = runs["lora"].metrics[0], runs["merged"].metrics[0]
    # The adapter stream: 210 modules x (A, B) in bf16, against the whole merged model.
    assert lora["actor/tinylora/sync_bytes"] < merged["actor/tinylora/sync_bytes"] / 50
    assert abs(lora["actor/tinylora/merge_fidelity"] - 1) < 1e-2


def test_mismatch_is_small_in_both_modes(runs):
    lora, merged = runs["lora"].metrics[0], runs["merged"].metrics[0]
    for key in MISMATCH:
        print(f"{key}: merged {merged[key]:.5f}  lora {lora[key]:.5f}")
    # Same order as the merged mode's (and as the CPU recipe's v = 0 steps, ~1e-3 k3 KL): the LoRA vLLM serves
    # is the trainer's adapter, not something else.
    for run in (lora, merged):
        assert run["rollout_corr/k3_kl"] < 1e-2 and run["training/rollout_probs_diff_mean"] < 2e-2
