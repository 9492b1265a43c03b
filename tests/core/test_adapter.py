"""Injection, the hooked forward and the merged stream, against a dense float64 ΔW computed independently."""

import copy
import math

import pytest
import torch

from tests.conftest import MLP, tiny_causal_lm
from tinylora_verl import TinyLoRAConfig, inject_tinylora
from tinylora_verl.core.factors import projections


def randomize_(adapter, std=0.3, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.vectors:
            p.copy_(std * torch.randn(p.shape, generator=gen))


def dense_reference(weight: torch.Tensor, name: str, v: torch.Tensor, r: int, seed: int) -> torch.Tensor:
    """ΔW = U Σ (Σ vᵢ Pᵢ) Vᵀ in float64 from numpy-free first principles: SVD, canonical sign, documented P."""
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    U, V = U[:, :r].clone(), Vh[:r].T.clone()
    for i in range(r):
        if U[U[:, i].abs().argmax(), i] < 0:
            U[:, i], V[:, i] = -U[:, i], -V[:, i]
    P = projections(seed, name, v.numel(), r).double()
    M = sum(v.double()[i] * P[i] for i in range(v.numel()))
    return U @ torch.diag(S[:r]) @ M @ V.T


# (case, model builder, config kwargs)
CASES = [
    ("mlp-untied", lambda: MLP(), {"target_modules": ["up_proj", "down_proj"], "tie_mode": "none", "u": 3}),
    ("mlp-full", lambda: MLP(), {"target_modules": ["up_proj", "down_proj"], "tie_mode": "full", "u": 2}),
    ("qwen2-budget7", lambda: tiny_causal_lm("qwen2"), {"budget": 7}),
    ("qwen2-tiled-r1", lambda: tiny_causal_lm("qwen2"), {"r": 1, "u": 4, "tie_size": 5}),
    ("qwen2-structured", lambda: tiny_causal_lm("qwen2"), {"tie_mode": "structured", "tie_size": 2, "u": 2}),
    ("llama-tiled", lambda: tiny_causal_lm("llama"), {"tie_size": 3, "u": 2, "seed": 9}),
    ("qwen3-r3", lambda: tiny_causal_lm("qwen3"), {"r": 3, "u": 2, "tie_size": 7}),
]
IDS = [c[0] for c in CASES]


def inputs_for(model):
    gen = torch.Generator().manual_seed(5)
    if isinstance(model, MLP):
        return (torch.randn(9, 10, generator=gen),)
    return (torch.randint(0, 128, (2, 12), generator=gen),)


def run(model, inputs):
    out = model(*inputs)
    return out if torch.is_tensor(out) else out.logits


@pytest.mark.parametrize("case, build, kwargs", CASES, ids=IDS)
def test_delta_matches_float64_reference(case, build, kwargs):
    model = build()
    config = TinyLoRAConfig(**kwargs)
    adapter = inject_tinylora(model, config)
    randomize_(adapter)
    for name in adapter.module_names:
        w = model.get_submodule(name).weight
        ref = dense_reference(w, name, adapter.vector_of(name).detach(), config.r, config.seed)
        got = adapter.delta_weight(name)
        assert got.dtype == torch.float32 and got.shape == w.shape
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case, build, kwargs", CASES, ids=IDS)
def test_hooked_equals_merged_equals_dense(case, build, kwargs):
    model = build()
    base = copy.deepcopy(model)
    x = inputs_for(model)
    adapter = inject_tinylora(model, TinyLoRAConfig(**kwargs))
    randomize_(adapter)
    with torch.no_grad():
        hooked = run(model, x)
        # the merged float32 stream, loaded into a plain copy of the base
        merged = copy.deepcopy(base)
        merged.load_state_dict(dict(adapter.merged_named_tensors(dtype=torch.float32)))
        merged_out = run(merged, x)
        # base + dense ΔW written directly
        dense = copy.deepcopy(base)
        for name in adapter.module_names:
            dense.get_submodule(name).weight += adapter.delta_weight(name)
        dense_out = run(dense, x)
        base_out = run(base, x)
    torch.testing.assert_close(hooked, merged_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hooked, dense_out, rtol=1e-5, atol=1e-5)
    assert (hooked - base_out).abs().max() > 1e-3, "the adapter must change the output for this test to mean anything"


@pytest.mark.parametrize("case, build, kwargs", CASES, ids=IDS)
def test_only_v_gets_gradients(case, build, kwargs):
    model = build()
    adapter = inject_tinylora(model, TinyLoRAConfig(**kwargs))
    randomize_(adapter, std=0.05)
    run(model, inputs_for(model)).square().mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert adapter.num_trainable == sum(p.numel() for p in adapter.parameters())


def test_zero_init_is_the_base_model(tiny_qwen2, input_ids):
    base = copy.deepcopy(tiny_qwen2)
    adapter = inject_tinylora(tiny_qwen2, TinyLoRAConfig(budget=7))
    assert all(torch.equal(p, torch.zeros_like(p)) for p in adapter.vectors)
    with torch.no_grad():
        torch.testing.assert_close(tiny_qwen2(input_ids).logits, base(input_ids).logits, rtol=0, atol=0)


def test_normal_init_is_seeded(tiny_qwen2):
    a = inject_tinylora(tiny_causal_lm(), TinyLoRAConfig(init="normal", init_std=0.01, seed=4))
    b = inject_tinylora(tiny_causal_lm(), TinyLoRAConfig(init="normal", init_std=0.01, seed=4))
    c = inject_tinylora(tiny_causal_lm(), TinyLoRAConfig(init="normal", init_std=0.01, seed=5))
    assert all(torch.equal(x, y) for x, y in zip(a.vectors, b.vectors))
    assert not all(torch.equal(x, y) for x, y in zip(a.vectors, c.vectors))
    assert 0 < torch.cat(list(a.vectors)).abs().max() < 0.1


def test_tied_modules_share_one_parameter(tiny_qwen2):
    adapter = inject_tinylora(tiny_qwen2, TinyLoRAConfig(tie_size=4))
    for group in adapter.tie_plan.groups:
        first = adapter.vector_of(group[0])
        assert all(adapter.vector_of(n) is first for n in group)
    a, b = adapter.tie_plan.groups[:2]
    assert adapter.vector_of(a[0]) is not adapter.vector_of(b[0])
    assert len(adapter.vectors) == len(adapter.tie_plan.groups) == 4  # 14 modules / 4 per group


def test_state_dict_names_are_untouched(tiny_qwen2):
    names = list(tiny_qwen2.state_dict())
    adapter = inject_tinylora(tiny_qwen2, TinyLoRAConfig())
    assert list(tiny_qwen2.state_dict()) == names
    assert [n for n, _ in adapter.merged_named_tensors()] == names
    assert list(adapter.state_dict()) == [f"vectors.{i}" for i in range(len(adapter.vectors))]


def test_bf16_base_forward_and_backward(input_ids):
    model = tiny_causal_lm(dtype=torch.bfloat16)
    ref = tiny_causal_lm(dtype=torch.float32)
    adapter = inject_tinylora(model, TinyLoRAConfig(tie_size=3))
    ref_adapter = inject_tinylora(ref, TinyLoRAConfig(tie_size=3))
    randomize_(adapter)
    randomize_(ref_adapter)
    out = model(input_ids).logits
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in adapter.vectors)
    with torch.no_grad():
        torch.testing.assert_close(out.float(), ref(input_ids).logits, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_activation_dtype_hook_matches_the_float32_hook(input_ids, dtype):
    """hook_dtype='activation': same logits and v-gradients as the float32 hook up to the model dtype's rounding
    (and bit-identical on a float32 model, where it does not apply)."""
    results = []
    for hook_dtype in ("float32", "activation"):
        model = tiny_causal_lm(dtype=dtype)
        adapter = inject_tinylora(model, TinyLoRAConfig(tie_size=3, hook_dtype=hook_dtype))
        randomize_(adapter)
        out = model(input_ids).logits
        assert out.dtype == dtype
        out.float().square().mean().backward()
        results.append((out.detach().float(), torch.cat([p.grad for p in adapter.vectors])))
    (out_ref, grad_ref), (out_act, grad_act) = results
    if dtype == torch.float32:
        assert torch.equal(out_act, out_ref) and torch.equal(grad_act, grad_ref)
    else:
        torch.testing.assert_close(out_act, out_ref, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(grad_act, grad_ref, rtol=5e-2, atol=5e-3)


def test_disable_adapter(tiny_qwen2, input_ids):
    base = copy.deepcopy(tiny_qwen2)
    adapter = inject_tinylora(tiny_qwen2, TinyLoRAConfig())
    randomize_(adapter)
    with torch.no_grad(), adapter.disable_adapter():
        torch.testing.assert_close(tiny_qwen2(input_ids).logits, base(input_ids).logits, rtol=0, atol=0)
    assert adapter.enabled


def test_remove_restores_the_base(tiny_qwen2, input_ids):
    base = copy.deepcopy(tiny_qwen2)
    adapter = inject_tinylora(tiny_qwen2, TinyLoRAConfig())
    randomize_(adapter)
    adapter.remove()
    with torch.no_grad():
        torch.testing.assert_close(tiny_qwen2(input_ids).logits, base(input_ids).logits, rtol=0, atol=0)
    assert not any("tinylora" in n for n, _ in tiny_qwen2.named_buffers())
    inject_tinylora(tiny_qwen2, TinyLoRAConfig())


MERGE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", MERGE_DTYPES, ids=str)
def test_merged_stream_is_float32_sum_cast_once(tiny_qwen2, dtype):
    adapter = inject_tinylora(tiny_qwen2, TinyLoRAConfig())
    randomize_(adapter, std=0.01)
    merged = dict(adapter.merged_named_tensors(dtype=dtype))
    for name, tensor in tiny_qwen2.state_dict().items():
        assert merged[name].dtype == dtype
        module = name[: -len(".weight")]
        if module in adapter.module_names:
            expected = (tensor.float() + adapter.delta_weight(module)).to(dtype)
        else:
            expected = tensor.to(dtype)
        assert torch.equal(merged[name], expected), name
    # streaming twice gives the same tensors: nothing was merged in place
    again = dict(adapter.merged_named_tensors(dtype=dtype))
    assert all(torch.equal(again[k], merged[k]) for k in merged)


def test_merge_fidelity(tiny_qwen2):
    adapter = inject_tinylora(tiny_qwen2, TinyLoRAConfig())
    assert adapter.merge_fidelity(torch.bfloat16)[0] == 1.0  # ΔW = 0 is delivered exactly
    randomize_(adapter, std=0.5)
    fp32, rows = adapter.merge_fidelity(torch.float32)
    assert abs(fp32 - 1.0) < 1e-4 and len(rows) == len(adapter.module_names)
    assert all(row.rel_error < 1e-4 for row in rows)
    randomize_(adapter, std=1e-4)
    bf16, rows = adapter.merge_fidelity(torch.bfloat16)
    assert all(row.rel_error > 0.5 for row in rows), "a 1e-4-scale ΔW must mostly round away in bf16"


def test_factors_accessor(tiny_qwen2):
    adapter = inject_tinylora(tiny_qwen2, TinyLoRAConfig(u=3))
    U, S, V, P = adapter.factors("model.layers.1.mlp.down_proj")
    assert (U.shape, S.shape, V.shape, P.shape) == ((64, 2), (2,), (96, 2), (3, 2, 2))
    with pytest.raises(KeyError, match=r"'lm_head' is not a TinyLoRA module"):
        adapter.factors("lm_head")


def test_no_matching_targets_lists_the_linears(tiny_qwen2):
    with pytest.raises(ValueError, match=r"match no nn.Linear in Qwen2ForCausalLM; its linear module suffixes are \['down_proj', 'gate_proj', 'k_proj', 'lm_head'"):
        inject_tinylora(tiny_qwen2, TinyLoRAConfig(target_modules=["query_key_value"]))


def test_rank_too_large_for_module():
    with pytest.raises(ValueError, match=r"SVD rank r=7 exceeds min\(out, in\)=6"):
        inject_tinylora(MLP(), TinyLoRAConfig(r=7, target_modules=["down_proj"]))


def test_double_injection_is_an_error(tiny_qwen2):
    inject_tinylora(tiny_qwen2, TinyLoRAConfig())
    with pytest.raises(ValueError, match="already carries TinyLoRA buffers; call adapter.remove"):
        inject_tinylora(tiny_qwen2, TinyLoRAConfig())


def test_merge_stats_count_bytes_and_fidelity(tiny_qwen2):
    from tinylora_verl.core.adapter import MergeStats

    adapter = inject_tinylora(tiny_qwen2, TinyLoRAConfig())
    randomize_(adapter, std=1.0)
    stats = MergeStats()
    out = dict(adapter.merged_named_tensors(dtype=torch.bfloat16, stats=stats))
    assert stats.tensors == len(out) and stats.merged == len(adapter.module_names)
    assert stats.bytes == sum(t.numel() * 2 for t in out.values())
    overall, _ = adapter.merge_fidelity(torch.bfloat16)
    assert abs(stats.fidelity - overall) < 1e-6 and stats.seconds > 0


def test_stream_without_a_target_weight_raises(tiny_qwen2):
    adapter = inject_tinylora(tiny_qwen2, TinyLoRAConfig())
    renamed = ((n.replace("model.layers.1.mlp", "model.layers.1.ffn"), t) for n, t in tiny_qwen2.state_dict().items())
    with pytest.raises(RuntimeError, match=r"ended without 3 TinyLoRA target weights \(first: model.layers.1.mlp.down_proj.weight\)"):
        list(adapter.merged_named_tensors(renamed))


def test_meta_model_gets_placeholders_then_real_factors(tiny_qwen2):
    """verl builds non-zero ranks on meta: injection must not need the weights there."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_qwen2.config)
    adapter = inject_tinylora(meta, TinyLoRAConfig(budget=7))
    assert adapter.fingerprint == "" and all(p.device.type == "cpu" for p in adapter.vectors)
    assert meta.model.layers[0].self_attn.q_proj.tinylora_U.device.type == "meta"
    assert adapter.tie_plan == inject_tinylora(tiny_qwen2, TinyLoRAConfig(budget=7)).tie_plan


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_v_never_leaves_the_trainer(value):
    """Fidelity reports it (never 1.0), and the merged and LoRA streams refuse to be built from it."""
    adapter = inject_tinylora(tiny_causal_lm(), TinyLoRAConfig(budget=7))
    with torch.no_grad():
        adapter.vectors[2].fill_(value)
    overall, rows = adapter.merge_fidelity(torch.bfloat16)
    assert math.isnan(overall) and any(math.isnan(r.fidelity) for r in rows)
    from tinylora_verl.core.adapter import MergeStats

    assert math.isnan(MergeStats(delta_sq=value, delivered_sq=1.0).fidelity)
    assert MergeStats().fidelity == 1.0  # a zero ΔW is delivered exactly
    for stream in (lambda: adapter.merged_named_tensors(dtype=torch.bfloat16),
                   lambda: adapter.lora_named_tensors(torch.bfloat16)):
        with pytest.raises(RuntimeError, match=r"v holds non-finite values .* refusing to build the (merged|LoRA) "
                                               r"stream"):
            next(iter(stream()))
