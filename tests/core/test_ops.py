"""The fused TinyLoRA linear and the hook's update, against autograd through the dense formula."""

import pytest
import torch
import torch.nn.functional as F

from tinylora_verl.core.factors import mix
from tinylora_verl.core.ops import (TinyLoRALinear, add_low_rank_update, factor_layouts, shared_input_groups,
                               shared_projection, tinylora_linear)


def factors(out_f, in_f, u, r, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out_f, r, generator=gen, dtype=torch.float64))[0].to(dtype)  # (out, r)
    V = torch.linalg.qr(torch.randn(in_f, r, generator=gen, dtype=torch.float64))[0].to(dtype)  # (in, r)
    S = (torch.rand(r, generator=gen, dtype=torch.float64) * 3 + 1).to(dtype)  # (r,)
    P = (torch.randn(u, r, r, generator=gen, dtype=torch.float64) / r**0.5).to(dtype)  # (u, r, r)
    v = torch.randn(u, generator=gen, dtype=torch.float64).to(dtype)  # (u,)
    return U, S, V, P, v


def adapted(variant, x, W, b, v, U, S, V, P, dtype=torch.float32):
    """``x (W + ΔW)ᵀ + b`` three ways: ``fused`` (the node projects x), ``shared`` (``h = x V`` given, as q/k/v
    and gate/up get it), ``hook`` (the base linear through autograd, then the in-place update)."""
    layout = factor_layouts(U, S, V, P, dtype)
    if variant == "fused":
        return tinylora_linear(x, W, b, v, layout)
    if variant == "shared":
        return tinylora_linear(x, W, b, v, layout, shared_projection(x, layout.Vt))
    return add_low_rank_update(F.linear(x, W, b), x, v, layout)


def dense_reference(x, W, b, v, U, S, V, P):
    """``x (W + U diag(S) Σ vᵢPᵢ Vᵀ)ᵀ + b``, differentiable by autograd in whatever dtype it is given."""
    M = (v[:, None, None] * P).sum(0)  # (r, r)
    y = x @ (W + U @ torch.diag(S) @ M @ V.T).T  # (..., out)
    return y if b is None else y + b


VARIANTS = ["fused", "shared", "hook"]
# (case, batch shape, out, in, u, r, bias); rows of 512 floats take the addcmul_ path in float32 on the CPU.
SHAPES = [("2d", (7,), 5, 6, 1, 2, False), ("3d", (2, 5), 9, 4, 3, 2, True), ("r1", (3, 4), 6, 6, 2, 1, False),
          ("r3", (11,), 8, 10, 4, 3, True), ("rows512", (2, 3), 512, 6, 2, 2, False),
          ("in512", (2, 3), 6, 512, 2, 2, True)]


def inputs(lead, out_f, in_f, bias, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=gen, dtype=dtype)
    W = torch.randn(out_f, in_f, generator=gen, dtype=dtype) / in_f**0.5
    b = torch.randn(out_f, generator=gen, dtype=dtype) if bias else None
    g = torch.randn(*lead, out_f, generator=gen, dtype=dtype)
    return x, W, b, g


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case, lead, out_f, in_f, u, r, bias", SHAPES, ids=[s[0] for s in SHAPES])
def test_adapted_linear_passes_gradcheck(case, lead, out_f, in_f, u, r, bias, variant):
    """float64 gradcheck in x and v, and (fused only: the hook's base is autograd's own) in W and b."""
    U, S, V, P, v = factors(out_f, in_f, u, r, seed=1, dtype=torch.float64)
    x, W, b, _ = inputs(lead, out_f, in_f, bias, seed=2, dtype=torch.float64)
    if in_f * out_f > 2000:
        x = x[..., :1, :] if x.dim() > 2 else x[:2]  # keeps the numerical Jacobian small
    train_base = variant == "fused"
    args = [t.requires_grad_(True) for t in (x, v, W) if t is not None]
    if b is not None:
        args.append(b.requires_grad_(train_base))
    W.requires_grad_(train_base)

    def f(x, v, W, *b):
        return adapted(variant, x, W, b[0] if b else None, v, U, S, V, P, torch.float64)

    assert torch.autograd.gradcheck(f, tuple(args))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case, lead, out_f, in_f, u, r, bias", SHAPES, ids=[s[0] for s in SHAPES])
def test_adapted_linear_matches_the_dense_formula_in_float64(case, lead, out_f, in_f, u, r, bias, variant):
    """float32 forward and gradients against the dense formula differentiated by autograd in float64."""
    U, S, V, P, v = factors(out_f, in_f, u, r, seed=3)
    x, W, b, g = inputs(lead, out_f, in_f, bias, seed=4, dtype=torch.float32)
    xs, vs = x.clone().requires_grad_(True), v.clone().requires_grad_(True)
    got = adapted(variant, xs, W, b, vs, U, S, V, P)
    got.backward(g)
    xd, vd = x.double().requires_grad_(True), v.double().requires_grad_(True)
    ref = dense_reference(xd, W.double(), None if b is None else b.double(), vd, U.double(), S.double(),
                          V.double(), P.double())
    ref.backward(g.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vs.grad.double(), vd.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_output_gets_the_float32_update_cast_once(variant):
    U, S, V, P, v = factors(6, 5, 2, 2, seed=5)
    x, W, _, _ = inputs((4,), 6, 5, False, seed=6, dtype=torch.float32)
    x, W = x.bfloat16(), W.bfloat16()
    got = adapted(variant, x, W, None, v, U, S, V, P)
    want = F.linear(x, W) + ((x.float() @ V) @ (S[:, None] * mix(v, P)).T @ U.T).bfloat16()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_under_autocast_the_base_is_autocasts_linear_and_the_update_float32(variant, bias):
    """Under CPU autocast: the output is autocast's own bf16 linear plus the float32 ΔW·x cast once, bit for bit;
    x's gradient is autocast's linear backward plus ΔW's float32 term."""
    U, S, V, P, v = factors(12, 10, 2, 2, seed=7)
    x, W, b, g = inputs((3, 4), 12, 10, bias, seed=8, dtype=torch.float32)
    g = g.bfloat16()
    xs, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = adapted(variant, xs, W, b, v, U, S, V, P)
        base = F.linear(xr, W, b)
    want = base + ((xr @ V) @ (S[:, None] * mix(v, P)).T @ U.T).bfloat16()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.backward(g)
    want.backward(g)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case, needs", [("x-only", (True, False)), ("v-only", (False, True)), ("both", (True, True))])
def test_fused_backward_computes_only_what_is_needed(case, needs):
    U, S, V, P, v = factors(7, 6, 2, 2, seed=9)
    x, W, _, g = inputs((5,), 7, 6, False, seed=10, dtype=torch.float32)
    x.requires_grad_(needs[0])
    v.requires_grad_(needs[1])
    adapted("fused", x, W, None, v, U, S, V, P).backward(g)
    assert (x.grad is not None) == needs[0] and (v.grad is not None) == needs[1]
    assert W.grad is None


def test_fused_linear_is_one_node_feeding_x_directly():
    """The base linear and the update are one autograd node whose input gradient goes straight to x: no separate
    base-linear node whose input gradient autograd would have to add to the update's."""
    U, S, V, P, v = factors(7, 6, 2, 2, seed=11)
    x, W, _, _ = inputs((2, 5), 7, 6, False, seed=12, dtype=torch.float32)
    x0 = x.clone().requires_grad_(True)
    xin = x0 * 2.0
    y = adapted("fused", xin, W, None, v.requires_grad_(True), U, S, V, P)
    assert type(y.grad_fn).__name__ == f"{TinyLoRALinear.__name__}Backward"
    nexts = [fn for fn, _ in y.grad_fn.next_functions if fn is not None]
    assert nexts[0] is xin.grad_fn and len(nexts) == 2  # x and v: W and the layout take no gradient


def test_layout_is_the_transposed_factors_and_the_flattened_core():
    U, S, V, P, v = factors(7, 512, 3, 2, seed=13)
    layout = factor_layouts(U, S, V, P, torch.bfloat16)
    assert layout.Ut.dtype == layout.Vt.dtype == torch.bfloat16 and layout.PSt.dtype == torch.float32
    assert layout.Ut.is_contiguous() and layout.Vt.is_contiguous()
    torch.testing.assert_close(layout.Ut, U.T.bfloat16())
    torch.testing.assert_close(layout.Vt, V.T.bfloat16())
    torch.testing.assert_close((layout.PSt @ v).view(2, 2), (S[:, None] * mix(v, P)).T)
    assert not layout.in_by_columns  # bf16 GEMMs have no 512-float dip
    assert factor_layouts(U, S, V, P, torch.float32)[3:] == (False, True, None)


def test_hook_update_of_a_saved_tensor_is_caught():
    """The hook's update is in place; autograd must refuse it when an earlier op saved the output."""
    U, S, V, P, v = factors(4, 3, 1, 2, seed=14)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(15), requires_grad=True)
    y = x @ torch.ones(3, 4)
    z = y * y  # mul saves y for its backward
    add_low_rank_update(y, x, v.requires_grad_(True), factor_layouts(U, S, V, P, torch.float32))
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


def test_shared_projection_is_outside_autograd_and_autocast():
    Vt = torch.randn(4, 6, generator=torch.Generator().manual_seed(16))
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(17), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = shared_projection(x, Vt)
    assert h.dtype == torch.float32 and not h.requires_grad and h.shape == (6, 4)
    torch.testing.assert_close(h, x.detach().reshape(6, 6) @ Vt.T)


class Float32Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of every float32 tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.sizes.append(t.numel())
        return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_ops_path_bounds_its_float32_temporaries(variant, monkeypatch):
    """bf16 activations through the torch-ops path (the GPU's): the float32 copies of x and g and the (tokens, out)
    product are made a block of rows at a time, with results bit-equal to one block."""
    from tinylora_verl.core import ops

    tokens, out_f, in_f = 48, 40, 32
    U, S, V, P, v = factors(out_f, in_f, 2, 2, seed=11)
    x, W, b, g = (t.bfloat16() if t is not None else None
                  for t in inputs((tokens,), out_f, in_f, True, seed=12, dtype=torch.float32))

    def run():
        xr, vr = x.clone().requires_grad_(), v.clone().requires_grad_()
        y = adapted(variant, xr, W, b, vr, U, S, V, P)
        y.backward(g)
        return y, xr.grad, vr.grad

    whole = run()
    monkeypatch.setattr(ops, "CHUNK_NUMEL", 4 * max(out_f, in_f))
    with Float32Allocations() as seen:
        chunked = run()
    for a, c in zip(whole, chunked):
        torch.testing.assert_close(c, a, rtol=0, atol=0)
    assert max(seen.sizes) <= ops.CHUNK_NUMEL, sorted(seen.sizes)[-5:]
    assert max(seen.sizes) < tokens * min(out_f, in_f) / 2  # far below what one block would make
