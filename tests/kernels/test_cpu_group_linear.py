"""Modules that read one x as one C++ node (``csrc/group_linear.cpp``): the outputs of one node per module bit for
bit, their gradients to float rounding (the group sums x's gradient in another order), the dense formula in
float64, tied vectors, the gradients asked for, autocast, inference mode and its errors."""

import pytest
import torch

from tinylora_verl.kernels import loader as cpu_kernel
from tinylora_verl.core.ops import factor_layouts, shared_projection, tinylora_linear
from tinylora_verl.kernels import GroupInputs, group_linear

from tests.core.test_ops import dense_reference, factors


def tinylora_group_linear(x, weights, biases, vectors, layouts, vt):
    """The group node over explicit tensors, as :class:`tinylora_verl.kernels.GroupNodes` runs it."""
    from types import SimpleNamespace

    modules = [SimpleNamespace(weight=w, bias=biases[i] if biases else None) for i, w in enumerate(weights)]
    return group_linear(x, GroupInputs(layouts, vt, modules, vectors, True))


@pytest.fixture(scope="module")
def kernel():
    return cpu_kernel.load("on")


def group(outs, in_f, u, r, bias, dtype, tied, seed, kernel):
    """k modules reading one x: their factors, layouts, weights, biases, vectors, x and output gradients."""
    gen = torch.Generator().manual_seed(seed)
    fs = [factors(o, in_f, u, r, seed=seed + 1 + m) for m, o in enumerate(outs)]
    layouts = tuple(factor_layouts(U, S, V, P, torch.float32, kernel=kernel) for U, S, V, P, _ in fs)
    vs = [fs[0][4]] * len(outs) if tied else [f[4] for f in fs]
    x = torch.randn(2, 5, in_f, generator=gen).to(dtype)
    Ws = [(torch.randn(o, in_f, generator=gen) / in_f**0.5).to(dtype) for o in outs]
    bs = [torch.randn(o, generator=gen).to(dtype) for o in outs] if bias else []
    gs = [torch.randn(2, 5, o, generator=gen).to(dtype) for o in outs]
    return fs, layouts, Ws, bs, vs, x, gs


def run(node, x, Ws, bs, vs, gs, used, grads=("x", "W", "b", "v")):
    """The outputs of ``node(x, Ws, bs, vs)`` and the gradients of ``Σ_{m in used} <y_m, g_m>`` for the leaves named
    in ``grads`` (None for the others); tied vectors stay one leaf."""
    xs = x.clone().requires_grad_("x" in grads)
    Wl = [W.clone().requires_grad_("W" in grads) for W in Ws]
    bl = [b.clone().requires_grad_("b" in grads) for b in bs]
    leaves = {}
    vl = [leaves.setdefault(id(v), v.clone().requires_grad_("v" in grads)) for v in vs]
    ys = node(xs, Wl, bl, vl)
    sum((ys[m] * gs[m].to(ys[m].dtype)).sum() for m in used).backward()
    return [y.detach() for y in ys], {"x": xs.grad, "W": [W.grad for W in Wl], "b": [b.grad for b in bl],
                                      "v": [v.grad for v in leaves.values()]}


def per_module(layouts, vt):
    """One C++ node per module, each given its slice of the shared projection (what ``group_nodes=False`` runs)."""
    r = layouts[0].Ut.shape[0]

    def node(x, Ws, bs, vs):
        h = shared_projection(x, vt, layouts[0].kernel)  # (tokens, k·r)
        return [tinylora_linear(x, W, bs[m] if bs else None, vs[m], layouts[m], h[:, m * r:(m + 1) * r])
                for m, W in enumerate(Ws)]

    return node


def grouped(layouts, vt):
    return lambda x, Ws, bs, vs: tinylora_group_linear(x, Ws, bs, vs, layouts, vt)


# (case, outs, in, u, r, bias, dtype, tied, outputs with a gradient, x-gradient rtol): k·r ≤ 16 adds the k updates in
# one pass (rank 6 and 8 compiled, 3 and 12 generic); r6-k3 (18) and fp16 take one update per module.
CASES = [
    ("qkv-fp32-bias", (9, 3, 3), 40, 2, 2, True, torch.float32, False, (0, 1, 2), 1e-5),
    ("qkv-bf16-tied", (12, 4, 4), 64, 1, 2, False, torch.bfloat16, True, (0, 1, 2), 2e-2),
    ("gate-up-bf16", (24, 24), 40, 2, 2, False, torch.bfloat16, False, (0, 1), 2e-2),
    ("gate-up-r4", (16, 16), 40, 3, 4, False, torch.float32, False, (0, 1), 1e-5),
    ("r1-k3", (5, 5, 5), 33, 2, 1, True, torch.float32, False, (0, 1, 2), 1e-5),
    ("r4-k3", (6, 6, 6), 24, 2, 4, False, torch.float32, True, (0, 1, 2), 1e-5),
    ("r6-k3-per-module", (7, 7, 7), 24, 2, 6, False, torch.float32, False, (0, 1, 2), 1e-5),
    ("unused-output", (9, 3, 3), 40, 2, 2, True, torch.float32, False, (0, 2), 1e-5),
    ("fp16-per-module", (9, 3, 3), 40, 2, 2, True, torch.float16, False, (0, 1, 2), 2e-2),
]


@pytest.mark.parametrize("case, outs, in_f, u, r, bias, dtype, tied, used, rtol", CASES, ids=[c[0] for c in CASES])
def test_group_node_equals_one_node_per_module(kernel, case, outs, in_f, u, r, bias, dtype, tied, used, rtol):
    _, layouts, Ws, bs, vs, x, gs = group(outs, in_f, u, r, bias, dtype, tied, seed=40, kernel=kernel)
    vt = torch.cat([lay.Vt for lay in layouts])  # (k·r, in)
    ys, got = run(grouped(layouts, vt), x, Ws, bs, vs, gs, used)
    ys_ref, want = run(per_module(layouts, vt), x, Ws, bs, vs, gs, used)
    for y, y_ref in zip(ys, ys_ref):
        assert y.dtype == dtype and torch.equal(y, y_ref)
    torch.testing.assert_close(got["x"], want["x"], rtol=rtol, atol=rtol * want["x"].abs().max().item())
    for name in ("W", "b"):  # the same products of the same g and x
        for a, b in zip(got[name], want[name]):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    for a, b in zip(got["v"], want["v"]):  # float64 sums of the same products, in another order
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_group_node_matches_the_dense_formula_in_float64(kernel, bias):
    fs, layouts, Ws, bs, vs, x, gs = group((9, 3, 3), 40, 2, 2, bias, torch.float32, False, seed=41, kernel=kernel)
    vt = torch.cat([lay.Vt for lay in layouts])
    ys, got = run(grouped(layouts, vt), x, Ws, bs, vs, gs, (0, 1, 2))

    def dense(x, Ws, bs, vs):
        return [dense_reference(x, W, bs[m] if bs else None, vs[m], *(t.double() for t in fs[m][:4]))
                for m, W in enumerate(Ws)]

    d = [t.double() for t in Ws], [t.double() for t in bs], [t.double() for t in vs]
    ys_ref, want = run(dense, x.double(), *d, [g.double() for g in gs], (0, 1, 2))
    for y, y_ref in zip(ys, ys_ref):
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["x"].double(), want["x"], rtol=1e-5, atol=1e-5)
    for name in ("W", "b", "v"):
        for a, b in zip(got[name], want[name]):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_tied_vectors_get_the_summed_gradient(kernel):
    _, layouts, Ws, _, vs, x, gs = group((9, 3, 3), 40, 2, 2, False, torch.float32, True, seed=42, kernel=kernel)
    vt = torch.cat([lay.Vt for lay in layouts])
    v = vs[0].clone().requires_grad_(True)
    ys = tinylora_group_linear(x.requires_grad_(True), Ws, [], [v, v, v], layouts, vt)
    assert "TinyLoRAGroupFn" in ys[0].grad_fn.name() and all(y.grad_fn is ys[0].grad_fn for y in ys)
    leaves = [fn.variable for fn, _ in ys[0].grad_fn.next_functions if fn is not None and hasattr(fn, "variable")]
    assert [id(t) for t in leaves] == [id(x), id(v), id(v), id(v)]
    _, want = run(per_module(layouts, vt), x.detach(), Ws, [], vs, gs, (0, 1, 2))
    sum((y * g).sum() for y, g in zip(ys, gs)).backward()
    torch.testing.assert_close(v.grad, want["v"][0], rtol=1e-6, atol=1e-7)


NEEDS = [("x-only", ("x",)), ("v-only", ("v",)), ("W-only", ("W",)), ("b-and-v", ("b", "v")),
         ("all", ("x", "W", "b", "v"))]


@pytest.mark.parametrize("case, needed", NEEDS, ids=[n[0] for n in NEEDS])
def test_group_node_computes_exactly_the_gradients_asked_for(kernel, case, needed):
    _, layouts, Ws, bs, vs, x, gs = group((9, 3, 3), 40, 2, 2, True, torch.float32, False, seed=43, kernel=kernel)
    vt = torch.cat([lay.Vt for lay in layouts])
    _, got = run(grouped(layouts, vt), x, Ws, bs, vs, gs, (0, 1, 2), grads=needed)
    _, want = run(per_module(layouts, vt), x, Ws, bs, vs, gs, (0, 1, 2))
    assert (got["x"] is not None) == ("x" in needed)
    for name in ("W", "b", "v"):
        assert all((t is not None) == (name in needed) for t in got[name]), name
        if name in needed:
            for a, b in zip(got[name], want[name]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_under_autocast_the_group_casts_as_the_per_module_nodes(kernel):
    _, layouts, Ws, bs, vs, x, gs = group((9, 3, 3), 40, 2, 2, True, torch.float32, False, seed=44, kernel=kernel)
    vt = torch.cat([lay.Vt for lay in layouts])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys, got = run(grouped(layouts, vt), x, Ws, bs, vs, gs, (0, 1, 2))
        ys_ref, want = run(per_module(layouts, vt), x, Ws, bs, vs, gs, (0, 1, 2))
    assert all(y.dtype == torch.bfloat16 and torch.equal(y, y_ref) for y, y_ref in zip(ys, ys_ref))
    assert got["x"].dtype == torch.float32 and all(w.dtype == torch.float32 for w in got["W"])
    torch.testing.assert_close(got["x"], want["x"], rtol=1e-5, atol=1e-5)


def test_inference_mode_runs_the_forward_alone(kernel):
    _, layouts, Ws, bs, vs, x, _ = group((9, 3, 3), 40, 2, 2, True, torch.bfloat16, False, seed=45, kernel=kernel)
    vt = torch.cat([lay.Vt for lay in layouts])
    want = per_module(layouts, vt)(x, Ws, bs, vs)
    with torch.inference_mode():
        got = tinylora_group_linear(x, Ws, bs, vs, layouts, vt)
    assert all(y.is_inference() and torch.equal(y, w) for y, w in zip(got, want))


def _operands():
    gen = torch.Generator().manual_seed(46)
    return dict(x=torch.randn(3, 4, generator=gen), weights=[torch.randn(5, 4, generator=gen)] * 2, biases=[],
                vs=[torch.randn(1, generator=gen)] * 2, uts=[torch.randn(2, 5, generator=gen)] * 2,
                vt=torch.randn(4, 4, generator=gen), psts=[torch.randn(4, 1, generator=gen)] * 2, cast_dtype=None)


BAD = [
    ("one-vs", dict(vs=[torch.zeros(1)]), r"group_linear: weights, vs, uts and psts need one entry per module and "
                                         r"biases one or none, got 2, 1, 2, 2 and 0"),
    ("one-bias", dict(biases=[torch.zeros(5)]), r"group_linear: .* got 2, 2, 2, 2 and 1"),
    ("vt-unstacked", dict(vt=torch.zeros(2, 4)), r"group_linear: vt must stack the modules' \(r, in\) factors as "
                                                r"\(4, in\), got \[2, 4\]"),
    ("weight-width", dict(weights=[torch.zeros(5, 4), torch.zeros(5, 3)]),
     r"group_linear: shapes do not chain .* got x \[3, 4\], weight \[5, 3\]"),
    ("pst-dtype", dict(psts=[torch.zeros(4, 1, dtype=torch.float64)] * 2),
     r"group_linear: pst must be a contiguous 2-D float32 CPU tensor, got Double \[4, 1\]"),
]


@pytest.mark.parametrize("case, breaks, message", BAD, ids=[b[0] for b in BAD])
def test_group_node_refuses_bad_operands_by_name(kernel, case, breaks, message):
    with pytest.raises(RuntimeError, match=message):
        kernel.group_linear(**{**_operands(), **breaks})
