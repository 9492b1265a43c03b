"""The fused linear as one C++ autograd node (``csrc/fused_linear.cpp``): the very numbers of the Python node
(:class:`TinyLoRALinear`, itself checked against float64 in test_ops.py) over the same kernels, the torch
fallbacks, the autograd plumbing (which gradients, saved tensors, inference mode) and its errors."""

import pytest
import torch

from tinylora_verl.kernels import loader as cpu_kernel
from tinylora_verl.core.ops import TinyLoRALinear, factor_layouts, shared_projection, tinylora_linear

from tests.core.test_ops import dense_reference, factors, inputs


@pytest.fixture(scope="module")
def kernel():
    return cpu_kernel.load("on")


def python_node(x, W, b, v, layout, h=None, cast_dtype=None):
    """The Python reference node, on the same layout (so the same kernels) as the C++ one."""
    if cast_dtype is None:
        return TinyLoRALinear.apply(x, W, b, v, h, layout, None)
    with torch.autocast("cpu", enabled=False):
        return TinyLoRALinear.apply(x, W, b, v, h, layout, cast_dtype)


def run(node, x, W, b, v, g, grads=("x", "W", "b", "v"), **kwargs):
    """``node`` 's output and the gradients of the leaves named in ``grads`` (None for the others)."""
    leaves = {"x": x.clone(), "W": W.clone(), "b": None if b is None else b.clone(), "v": v.clone()}
    for name, t in leaves.items():
        if t is not None and name in grads:
            t.requires_grad_(True)
    h = kwargs.pop("h", None)
    h = h(leaves["x"]) if callable(h) else h
    y = node(leaves["x"], leaves["W"], leaves["b"], leaves["v"], h=h, **kwargs)
    y.backward(g.to(y.dtype))
    return y.detach(), {k: None if t is None else t.grad for k, t in leaves.items()}


# (case, batch shape, out, in, u, r, bias, activation dtype, shared projection)
CASES = [
    ("fp32", (7,), 5, 6, 1, 2, False, torch.float32, False),
    ("fp32-3d-bias", (2, 5), 9, 40, 3, 2, True, torch.float32, False),
    ("fp32-shared", (2, 5), 9, 40, 3, 2, True, torch.float32, True),
    ("fp32-r3-rows512", (3, 4), 512, 24, 4, 3, False, torch.float32, False),
    ("bf16-bias", (2, 5), 24, 1536, 2, 2, True, torch.bfloat16, False),
    ("bf16-shared-r1", (6,), 12, 64, 2, 1, False, torch.bfloat16, True),
    ("fp16-fallback", (2, 5), 9, 40, 3, 2, True, torch.float16, False),
    ("fp64-fallback", (4,), 6, 8, 2, 2, True, torch.float64, False),
]


@pytest.mark.parametrize("case, lead, out_f, in_f, u, r, bias, dtype, shared", CASES, ids=[c[0] for c in CASES])
def test_cpp_node_equals_the_python_node(kernel, case, lead, out_f, in_f, u, r, bias, dtype, shared):
    """Output and every gradient bit for bit: the same ops on the same layout, in the same order (fp16 and
    float64 activations take the torch fallbacks on both sides)."""
    U, S, V, P, v = factors(out_f, in_f, u, r, seed=21)
    x, W, b, g = inputs(lead, out_f, in_f, bias, seed=22, dtype=dtype)
    layout = factor_layouts(U, S, V, P, torch.float32, kernel=kernel)
    h = (lambda xs: shared_projection(xs, layout.Vt, kernel)) if shared else None
    y_cpp, grads_cpp = run(lambda *a, h: tinylora_linear(*a, layout, h), x, W, b, v, g, h=h)
    y_py, grads_py = run(lambda *a, h: python_node(*a, layout, h), x, W, b, v, g, h=h)
    assert y_cpp.dtype == dtype and torch.equal(y_cpp, y_py)
    for name in grads_py:
        if grads_py[name] is not None:
            assert grads_cpp[name].dtype == grads_py[name].dtype and torch.equal(grads_cpp[name], grads_py[name]), name


@pytest.mark.parametrize("case, lead, out_f, in_f, u, r, bias", [("2d", (7,), 5, 6, 1, 2, False),
                                                                  ("3d-bias", (2, 3), 512, 24, 3, 2, True)],
                         ids=["2d", "3d-bias"])
def test_cpp_node_matches_the_dense_formula_in_float64(kernel, case, lead, out_f, in_f, u, r, bias):
    U, S, V, P, v = factors(out_f, in_f, u, r, seed=23)
    x, W, b, g = inputs(lead, out_f, in_f, bias, seed=24, dtype=torch.float32)
    layout = factor_layouts(U, S, V, P, torch.float32, kernel=kernel)
    y, grads = run(lambda *a, h: tinylora_linear(*a, layout, h), x, W, b, v, g)
    ref, want = run(lambda *a, h: dense_reference(*a, U.double(), S.double(), V.double(), P.double()),
                    x.double(), W.double(), None if b is None else b.double(), v.double(), g.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        if grad is not None:
            torch.testing.assert_close(grad.double(), want[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_under_autocast_the_cpp_node_casts_as_the_python_node(kernel, bias):
    """bf16 autocast over float32 x and W: the base in bf16, x's gradient back in float32, as the Python node."""
    U, S, V, P, v = factors(9, 40, 2, 2, seed=25)
    x, W, b, g = inputs((2, 5), 9, 40, bias, seed=26, dtype=torch.float32)
    layout = factor_layouts(U, S, V, P, torch.float32, kernel=kernel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_cpp, grads_cpp = run(lambda *a, h: tinylora_linear(*a, layout, h), x, W, b, v, g)
    y_py, grads_py = run(lambda *a, h: python_node(*a, layout, h, cast_dtype=torch.bfloat16), x, W, b, v, g)
    assert y_cpp.dtype == torch.bfloat16 and torch.equal(y_cpp, y_py)
    assert grads_cpp["x"].dtype == torch.float32 and grads_cpp["W"].dtype == torch.float32
    for name in grads_py:
        if grads_py[name] is not None:
            assert torch.equal(grads_cpp[name], grads_py[name]), name


# Which leaves require grad; the bias shifts v's place among the node's tensor inputs, so it is in every row.
NEEDS = [("x-only", ("x",)), ("v-only", ("v",)), ("W-only", ("W",)), ("b-and-v", ("b", "v")),
         ("all", ("x", "W", "b", "v"))]


@pytest.mark.parametrize("case, needed", NEEDS, ids=[n[0] for n in NEEDS])
def test_cpp_node_computes_exactly_the_gradients_asked_for(kernel, case, needed):
    U, S, V, P, v = factors(9, 40, 2, 2, seed=27)
    x, W, b, g = inputs((2, 5), 9, 40, True, seed=28, dtype=torch.float32)
    layout = factor_layouts(U, S, V, P, torch.float32, kernel=kernel)
    _, got = run(lambda *a, h: tinylora_linear(*a, layout, h), x, W, b, v, g, grads=needed)
    _, want = run(lambda *a, h: python_node(*a, layout, h), x, W, b, v, g)
    for name in ("x", "W", "b", "v"):
        assert (got[name] is not None) == (name in needed), name
        if name in needed:
            assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("v_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=["bf16", "fp16", "fp64"])
def test_cpp_node_takes_v_in_any_floating_dtype(kernel, v_dtype):
    """v's dtype reaches the core through the node's own read of v, and its gradient comes back in that dtype,
    the same bits as the Python node's."""
    U, S, V, P, v = factors(9, 40, 3, 2, seed=31)
    x, W, b, g = inputs((2, 5), 9, 40, True, seed=32, dtype=torch.float32)
    layout = factor_layouts(U, S, V, P, torch.float32, kernel=kernel)
    y_cpp, got = run(lambda *a, h: tinylora_linear(*a, layout, h), x, W, b, v.to(v_dtype), g)
    y_py, want = run(lambda *a, h: python_node(*a, layout, h), x, W, b, v.to(v_dtype), g)
    assert torch.equal(y_cpp, y_py) and got["v"].dtype == v_dtype and torch.equal(got["v"], want["v"])


def test_core_and_grad_v_are_float64_sums_rounded_once(kernel):
    """With cancelling terms (1e8 + 1 - 1e8) a float32 sum in any order loses the 1; both nodes' cores and v
    gradients are the float64 sum rounded once, so they keep it, whatever order they add in."""
    from tinylora_verl.core.ops import _core_t, _grad_v

    r, u = 2, 3
    x, W, ut = torch.zeros(1, 4), torch.zeros(3, 4), torch.eye(r, 3)  # Uᵀ = [I | 0]
    # Forward: each core entry sums a row of PSt (r·r, u) against v = 1.
    pst_rows = torch.tensor([[1e8, 1.0, -1e8]] * (r * r))
    y = kernel.linear(x, W, None, torch.ones(u), torch.tensor([[1.0, 0.0]]), ut, torch.zeros(r, 4), pst_rows, None)
    assert torch.equal(y, torch.tensor([[1.0, 1.0, 0.0]]))  # h (Σ M)ᵀ Uᵀ: row 0 of the core, then a zero column
    assert torch.equal(_core_t(torch.ones(u), pst_rows, r), torch.ones(r, r))
    # Backward: ∂L/∂vᵢ sums column i of PSt against vec(hᵀ gU) = 1 (h = [1, 1], g = [1, 1, 0] so gU = [1, 1]).
    pst_cols = torch.tensor([[1e8] * u, [1.0] * u, [-1e8] * u, [0.0] * u])
    v = torch.zeros(u, requires_grad=True)
    kernel.linear(x, W, None, v, torch.ones(1, r), ut, torch.zeros(r, 4), pst_cols, None).backward(
        torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.equal(v.grad, torch.ones(u))
    assert torch.equal(_grad_v(torch.ones(r, r), pst_cols, torch.float32), torch.ones(u))


def test_cpp_node_is_one_node_feeding_x_and_v_directly(kernel):
    U, S, V, P, v = factors(7, 6, 2, 2, seed=29)
    x, W, _, _ = inputs((2, 5), 7, 6, False, seed=30, dtype=torch.float32)
    xin = x.requires_grad_(True) * 2.0
    vs = v.requires_grad_(True)
    y = tinylora_linear(xin, W, None, vs, factor_layouts(U, S, V, P, torch.float32, kernel=kernel))
    assert "TinyLoRALinearFn" in y.grad_fn.name()
    nexts = [fn for fn, _ in y.grad_fn.next_functions if fn is not None]
    assert nexts[0] is xin.grad_fn and len(nexts) == 2 and nexts[1].variable is vs


@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-W", "trained-W"])
def test_saved_tensor_hooks_see_the_activations(kernel, weight_grad):
    """h and W always, x only when W's gradient needs it: the same saved variables as the Python node."""
    U, S, V, P, v = factors(9, 40, 2, 2, seed=31)
    x, W, _, g = inputs((2, 5), 9, 40, False, seed=32, dtype=torch.float32)
    layout = factor_layouts(U, S, V, P, torch.float32, kernel=kernel)
    shapes = {}
    for name, node in (("cpp", lambda *a: tinylora_linear(*a, layout)), ("py", lambda *a: python_node(*a, layout))):
        packed = []
        xs, Ws, vs = x.clone().requires_grad_(True), W.clone().requires_grad_(weight_grad), v.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(tuple(t.shape)) or t.clone(),
                                                      lambda t: t):
            y = node(xs, Ws, None, vs)
        y.backward(g)
        shapes[name] = sorted(packed)
    assert shapes["cpp"] == shapes["py"] == sorted([(10, 2), (9, 40)] + [(2, 5, 40)] * weight_grad)


def test_inference_mode_runs_the_forward_alone(kernel):
    U, S, V, P, v = factors(9, 40, 2, 2, seed=33)
    x, W, b, _ = inputs((2, 5), 9, 40, True, seed=34, dtype=torch.bfloat16)
    layout = factor_layouts(U, S, V, P, torch.float32, kernel=kernel)
    want = python_node(x, W, b, v, layout)
    with torch.inference_mode():
        got = tinylora_linear(x, W, b, v, layout)
    assert got.is_inference() and torch.equal(got, want)


def _operands():
    gen = torch.Generator().manual_seed(35)
    return dict(x=torch.randn(3, 4, generator=gen), weight=torch.randn(5, 4, generator=gen), bias=None,
                v=torch.randn(1, generator=gen), h=None, ut=torch.randn(2, 5, generator=gen),
                vt=torch.randn(2, 4, generator=gen), pst=torch.randn(4, 1, generator=gen), cast_dtype=None)


BAD = [
    ("ut-float64", dict(ut=torch.zeros(2, 5, dtype=torch.float64)), r"linear: ut must be a contiguous 2-D float32 CPU "
                                                                    r"tensor, got Double \[2, 5\]"),
    ("vt-strided", dict(vt=torch.zeros(4, 2).T), r"linear: vt must be a contiguous .* with strides \[1, 2\]"),
    ("vt-width", dict(vt=torch.zeros(2, 3)), r"linear: shapes do not chain .* got x \[3, 4\], .* vt \[2, 3\]"),
    ("pst-u", dict(pst=torch.zeros(4, 2)), r"linear: shapes do not chain .* v \[1\], .* pst \[4, 2\]"),
    ("rank-17", dict(ut=torch.zeros(17, 5), vt=torch.zeros(17, 4), pst=torch.zeros(289, 1)),
     r"linear: shapes do not chain .* with 1 <= r <= 16: .* ut \[17, 5\]"),
    ("h-shape", dict(h=torch.zeros(3, 3)), r"linear: h must be \(tokens, r\) = \(3, 2\) float32, got Float \[3, 3\]"),
    ("h-dtype", dict(h=torch.zeros(3, 2, dtype=torch.bfloat16)), r"linear: h must be .* got BFloat16 \[3, 2\]"),
]


@pytest.mark.parametrize("case, breaks, message", BAD, ids=[b[0] for b in BAD])
def test_cpp_node_refuses_bad_operands_by_name(kernel, case, breaks, message):
    with pytest.raises(RuntimeError, match=message):
        kernel.linear(**{**_operands(), **breaks})
