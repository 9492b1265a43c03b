"""The hand-written forward/backward of the adapter update, against autograd through the dense formula."""

import pytest
import torch

from tests.conftest import tiny_causal_lm
from tinylora_verl import TinyLoRAConfig, inject_tinylora
from tinylora_verl.factors import mix
from tinylora_verl.ops import (add_low_rank_update, add_projected_low_rank_update, factor_layouts, input_projection,
                                shared_input_groups)


def factors(out_f, in_f, u, r, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out_f, r, generator=gen, dtype=torch.float64))[0].to(dtype)  # (out, r)
    V = torch.linalg.qr(torch.randn(in_f, r, generator=gen, dtype=torch.float64))[0].to(dtype)  # (in, r)
    S = (torch.rand(r, generator=gen, dtype=torch.float64) * 3 + 1).to(dtype)  # (r,)
    P = (torch.randn(u, r, r, generator=gen, dtype=torch.float64) / r**0.5).to(dtype)  # (u, r, r)
    v = torch.randn(u, generator=gen, dtype=torch.float64).to(dtype)  # (u,)
    return U, S, V, P, v


def update(variant, y, x, v, U, S, V, P, dtype=torch.float32):
    """The hook's two paths: ``shared`` gets ``h = x V`` from :func:`input_projection` (as q/k/v and gate/up do),
    ``projected`` projects x inside the node."""
    layout = factor_layouts(U, S, V, P, dtype)
    if variant == "shared":
        return add_low_rank_update(y, input_projection(x, layout.Vt, dtype), v, layout)
    return add_projected_low_rank_update(y, x, v, layout)


VARIANTS = ["shared", "projected"]
# (case, batch shape, out, in, u, r); rows of 512 floats take the addcmul_ path in float32 on the CPU.
SHAPES = [("2d", (7,), 5, 6, 1, 2), ("3d", (2, 5), 9, 4, 3, 2), ("r1", (3, 4), 6, 6, 2, 1), ("r3", (11,), 8, 10, 4, 3),
          ("rows512", (2, 3), 512, 6, 2, 2)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case, lead, out_f, in_f, u, r", SHAPES, ids=[s[0] for s in SHAPES])
def test_update_passes_gradcheck(case, lead, out_f, in_f, u, r, variant):
    U, S, V, P, v = factors(out_f, in_f, u, r, seed=1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    y0 = torch.randn(*lead, out_f, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(*lead, in_f, generator=gen, dtype=torch.float64, requires_grad=True)
    v.requires_grad_(True)

    def f(y0, x, v):
        # y0 * 1 keeps the in-place update off a leaf, as a linear's output is in the model.
        return update(variant, y0 * 1, x, v, U, S, V, P, torch.float64)

    assert torch.autograd.gradcheck(f, (y0, x, v))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case, lead, out_f, in_f, u, r", SHAPES, ids=[s[0] for s in SHAPES])
def test_update_matches_the_dense_formula_in_float64(case, lead, out_f, in_f, u, r, variant):
    """float32 forward and gradients against ``y + x (U diag(S) Σ vᵢPᵢ Vᵀ)ᵀ`` differentiated by autograd in float64."""
    U, S, V, P, v = factors(out_f, in_f, u, r, seed=3)
    gen = torch.Generator().manual_seed(4)
    y0, x, g = (torch.randn(*lead, n, generator=gen) for n in (out_f, in_f, out_f))
    xs, vs = x.clone().requires_grad_(True), v.clone().requires_grad_(True)
    got = update(variant, y0.clone(), xs, vs, U, S, V, P)
    got.backward(g)
    xd, vd = x.double().requires_grad_(True), v.double().requires_grad_(True)
    M = (vd[:, None, None] * P.double()).sum(0)  # (r, r)
    dW = U.double() @ torch.diag(S.double()) @ M @ V.double().T  # (out, in)
    ref = y0.double() + xd @ dW.T
    ref.backward(g.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vs.grad.double(), vd.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_output_gets_the_float32_update_cast_once(variant):
    U, S, V, P, v = factors(6, 5, 2, 2, seed=5)
    gen = torch.Generator().manual_seed(6)
    y0, x = torch.randn(4, 6, generator=gen).bfloat16(), torch.randn(4, 5, generator=gen).bfloat16()
    got = update(variant, y0.clone(), x, v, U, S, V, P)
    want = y0 + ((x.float() @ V) @ (S[:, None] * mix(v, P)).T @ U.T).bfloat16()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_layout_is_the_transposed_factors_and_the_flattened_core():
    U, S, V, P, v = factors(7, 5, 3, 2, seed=9)
    layout = factor_layouts(U, S, V, P, torch.bfloat16)
    assert layout.Ut.dtype == layout.Vt.dtype == torch.bfloat16 and layout.PSt.dtype == torch.float32
    assert layout.Ut.is_contiguous() and layout.Vt.is_contiguous()
    torch.testing.assert_close(layout.Ut, U.T.bfloat16())
    torch.testing.assert_close(layout.Vt, V.T.bfloat16())
    torch.testing.assert_close((layout.PSt @ v).view(2, 2), (S[:, None] * mix(v, P)).T)


@pytest.mark.parametrize("variant", VARIANTS)
def test_in_place_update_of_a_saved_tensor_is_caught(variant):
    """The update is in place; autograd must refuse it when an earlier op saved the output for its backward."""
    U, S, V, P, v = factors(4, 3, 1, 2, seed=7)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(8), requires_grad=True)
    y = x @ torch.ones(3, 4)
    z = y * y  # mul saves y for its backward
    update(variant, y, x, v.requires_grad_(True), U, S, V, P)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (z.sum() + y.sum()).backward()


# (case, names, expected groups)
GROUPS = [
    ("llama-layer", ["l.0.self_attn.q_proj", "l.0.self_attn.k_proj", "l.0.self_attn.v_proj", "l.0.self_attn.o_proj",
                     "l.0.mlp.gate_proj", "l.0.mlp.up_proj", "l.0.mlp.down_proj"],
     [["l.0.self_attn.q_proj", "l.0.self_attn.k_proj", "l.0.self_attn.v_proj"], ["l.0.mlp.gate_proj", "l.0.mlp.up_proj"]]),
    ("order-independent", ["a.v_proj", "a.q_proj"], [["a.q_proj", "a.v_proj"]]),
    ("different-parents", ["a.q_proj", "b.k_proj"], []),
    ("no-partner", ["a.q_proj", "a.o_proj", "a.down_proj"], []),
]


@pytest.mark.parametrize("case, names, expected", GROUPS, ids=[g[0] for g in GROUPS])
def test_shared_input_groups(case, names, expected):
    assert sorted(shared_input_groups(names)) == sorted(expected)


# (model dtype, hook_dtype, v-gradient rtol): in bf16 the shared GEMM rounds the input gradient once instead
# of once per module, so the gradients agree only to bf16 precision accumulated over the layers.
SHARING = [(torch.float32, "float32", 1e-5), (torch.bfloat16, "float32", 3e-2), (torch.bfloat16, "activation", 5e-2)]


@pytest.mark.parametrize("dtype, hook_dtype, rtol", SHARING, ids=["fp32", "bf16", "bf16-activation"])
def test_shared_projection_is_exact_and_released(dtype, hook_dtype, rtol):
    """q/k/v and gate/up share x V in one GEMM: same logits and v-gradients as one GEMM per module, and the
    cache holds no input after the forward."""
    results = []
    for share in (True, False):
        model = tiny_causal_lm("llama").to(dtype)
        adapter = inject_tinylora(model, TinyLoRAConfig(tie_size=3, u=2, init="normal", init_std=0.3, hook_dtype=hook_dtype))
        if not share:
            adapter._siblings = {}
            for h in adapter._hooks:
                h.remove()
            adapter._hooks = [m.register_forward_hook(adapter._make_hook(n)) for n, m in adapter._modules_by_name.items()]
        else:
            assert len(adapter._siblings) == 2 * 5  # 2 layers x (q, k, v, gate, up)
        ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
        logits = model(input_ids=ids).logits.float()
        logits.square().mean().backward()
        assert adapter._shared_inputs == {}
        results.append((logits.detach(), [p.grad.clone() for p in adapter.parameters()]))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=rtol, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6)


def test_siblings_fed_different_inputs_fall_back_to_their_own_projection():
    """Sharing is decided by the identity of the input tensor: a model that feeds k another tensor than q still
    gets each module's own ΔW·x."""
    model = tiny_causal_lm("llama")
    adapter = inject_tinylora(model, TinyLoRAConfig(tie_size=3, u=2, init="normal", init_std=0.3))
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(2)
    xq, xk = torch.randn(5, 64, generator=gen), torch.randn(5, 64, generator=gen)
    with torch.no_grad():
        got = (attn.q_proj(xq), attn.k_proj(xk), attn.v_proj(xq))
        want = [x @ (m.weight + adapter.delta_weight(n)).T for x, (n, m) in
                zip((xq, xk, xq), ((f"model.layers.0.self_attn.{p}", getattr(attn, p)) for p in ("q_proj", "k_proj", "v_proj")))]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The unmatched calls leave a cache entry behind, holding only a weak reference to its input.
    entries = list(adapter._shared_inputs.values())
    assert entries
    del xq, xk
    assert all(ref() is None for ref, _, _ in entries)


@pytest.mark.parametrize("change", ["in-place", "replaced"])
def test_cached_layouts_follow_the_factor_buffers(change):
    """The hook's cached layouts (and the stacked q/k/v Vᵀ) are rebuilt when a factor buffer is written in place,
    as a broadcast from rank 0 does, or replaced, as ``model.to(...)`` does."""
    model = tiny_causal_lm("llama")
    adapter = inject_tinylora(model, TinyLoRAConfig(tie_size=3, u=2, init="normal", init_std=0.3))
    attn = model.model.layers[0].self_attn
    names = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))

    def check():
        with torch.no_grad():
            for name in names:  # q, k, v share one projection of the same x; o projects its own
                mod = model.get_submodule(name)
                torch.testing.assert_close(mod(x), x @ (mod.weight + adapter.delta_weight(name)).T, rtol=1e-5,
                                           atol=1e-5)

    check()
    for mod in (attn.k_proj, attn.o_proj):
        if change == "in-place":
            mod.tinylora_V.mul_(-2.0)
            mod.tinylora_S.add_(1.0)
        else:
            mod.tinylora_V = mod.tinylora_V * -2.0
            mod.tinylora_S = mod.tinylora_S + 1.0
    check()


def test_hook_under_autocast_adds_the_float32_update_and_backpropagates():
    """verl runs the actor's forward under autocast: the hook must still compute ΔW·x in float32 and cast it once
    (not in the autocast dtype), and the backward must run (it failed on the bf16 activations autocast saved)."""
    model = tiny_causal_lm("llama")
    adapter = inject_tinylora(model, TinyLoRAConfig(tie_size=3, u=2, init="normal", init_std=0.3))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in adapter.parameters())
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"):  # shared, own projection
        mod = model.get_submodule(name)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            got = mod(x)
            with adapter.disable_adapter():
                base = mod(x)
        assert got.dtype == base.dtype == torch.bfloat16
        torch.testing.assert_close(got, base + (x @ adapter.delta_weight(name).T).bfloat16(), rtol=0, atol=0)
