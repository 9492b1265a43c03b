"""Remove-padding (packed micro-batches) is allowed only with attention that keeps the sequences apart.

On CPU, through verl's own ``infer_batch``: packed log-probs equal padded ones for every implementation the engine
allows with remove-padding here, and differ once transformers' packed-sequence masking is switched off (so the
comparison can fail). The flash-attn kernels need a GPU; ``bench/gpu_smoke.py`` makes the same comparison there.
"""

import pytest
import torch

from tests.verl import harness
from tinylora_verl.verl import attention

LENGTHS = [7, 12, 3, 9]
TINYLORA = {"enable": True, "budget": 7, "init": "normal", "init_std": 0.05}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    harness.activate_cpu()
    harness.init_single_process()
    return harness.save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.mark.slow
@pytest.mark.parametrize("implementation", attention.MASKED_IMPLEMENTATIONS)
def test_packed_log_probs_equal_padded_ones(model_dir, implementation, monkeypatch):
    engine = harness.build_engine(model_dir, TINYLORA, attn_implementation=implementation, use_remove_padding=True)
    assert engine.module.config._attn_implementation == implementation
    packed = harness.log_probs(engine, LENGTHS, remove_padding=True)
    padded = harness.log_probs(engine, LENGTHS, remove_padding=False)
    assert [t.shape[0] for t in packed] == LENGTHS
    for p, q in zip(packed, padded):
        # float32 engine; the two paths differ only in how the softmax's masked terms are skipped.
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    # Control: without transformers' packed-sequence mask the later sequences attend to the earlier ones.
    from transformers import masking_utils

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    mixed = harness.log_probs(engine, LENGTHS, remove_padding=True)
    assert max((m - q).abs().max().item() for m, q in zip(mixed[1:], padded[1:])) > 0.1


@pytest.mark.slow
def test_engine_refuses_remove_padding_with_an_unpacking_implementation(model_dir):
    with pytest.raises(ValueError, match=r"use_remove_padding=true packs .* attn_implementation='paged_attention' "
                                         r"would let them attend to each other"):
        harness.build_engine(model_dir, TINYLORA, attn_implementation="paged_attention", use_remove_padding=True)


def test_masked_implementations_need_transformers_packed_masks(monkeypatch):
    attention.check_attention(True, "sdpa", on_gpu=False)
    monkeypatch.setattr(attention, "transformers_packs_masks", lambda: False)
    assert attention.packing_implementations() == attention.VARLEN_IMPLEMENTATIONS
    with pytest.raises(ValueError, match=r"attn_implementation='sdpa' would let them attend to each other. With "
                                         r"remove-padding use one of \['flash_attention_2', 'flash_attention_3'\]"):
        attention.check_attention(True, "sdpa", on_gpu=False)
    attention.check_attention(False, "sdpa", on_gpu=False)


def test_flash_attention_needs_its_package_on_a_gpu(monkeypatch):
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"attn_implementation='flash_attention_2' \(verl's default\) needs the "
                                         r"flash_attn package"):
        attention.check_attention(True, "flash_attention_2", on_gpu=True)
    attention.check_attention(True, "flash_attention_2", on_gpu=False)  # a CPU process never loads it


def test_verl_default_is_flash_attention_2():
    assert attention.attention_implementation({}) == "flash_attention_2"
    assert attention.attention_implementation({"attn_implementation": "sdpa"}) == "sdpa"
