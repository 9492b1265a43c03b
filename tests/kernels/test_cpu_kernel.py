"""The one-pass CPU kernels (``y ← y + (a core) bt``, the projection, the backward): numerics against float64,
their errors, the build policy, and the fused linear running on them."""

import warnings

import pytest
import torch

from tests.conftest import assert_rounded_once_to_bf16, tiny_causal_lm
from tinylora_verl import TinyLoRAConfig, inject_tinylora
from tinylora_verl.kernels import loader as cpu_kernel
from tinylora_verl.core.ops import _add_rank_r_, _project, factor_layouts, shared_projection, tinylora_linear


@pytest.fixture(scope="module")
def kernel():
    return cpu_kernel.load("on")


def operands(rows, n, r, dtype, seed, strided=False):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, n, generator=gen).to(dtype)  # (rows, n)
    a = torch.randn(rows, 3 * r if strided else r, generator=gen)  # (rows, r) or (rows, 3r)
    if strided:
        a = a[:, r:2 * r]  # rows strided, as the q/k/v shared projection's slice is
    core = torch.randn(r, r, generator=gen) * 0.1  # (r, r)
    bt = torch.randn(r, n, generator=gen) / n**0.5  # (r, n)
    return y, a, core, bt


def reference(y, a, core, bt):
    """The exact sum in float64."""
    return y.double() + (a.double() @ core.double()) @ bt.double()  # (rows, n)


# (case, rows, n, r, strided a): widths around the 512-float rows where MKL's K = r GEMM dips and off the 16/32-lane
# steps, ranks 1-4 (compiled per rank) and 5 (the generic loop), one row.
CASES = [("tiny", 3, 5, 2, False), ("one-row", 1, 576, 2, False), ("r1", 7, 33, 1, False), ("r3", 9, 64, 3, False),
         ("wide", 300, 1536, 2, False), ("strided-a", 64, 576, 2, True), ("r3-strided", 17, 100, 3, True),
         ("r4-tails", 5, 47, 4, False), ("r5-generic", 6, 50, 5, True)]


@pytest.mark.parametrize("case, rows, n, r, strided", CASES, ids=[c[0] for c in CASES])
def test_float32_matches_float64(kernel, case, rows, n, r, strided):
    y, a, core, bt = operands(rows, n, r, torch.float32, seed=1, strided=strided)
    want = reference(y, a, core, bt)
    kernel.add_rank_r_(y, a, core, bt)
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case, rows, n, r, strided", CASES, ids=[c[0] for c in CASES])
def test_bfloat16_is_the_float32_sum_rounded_once(kernel, case, rows, n, r, strided):
    """Within half a bf16 ulp of the exact sum (plus float32's own error), and never worse on average than the
    torch ops' cast-then-add, which rounds twice."""
    y, a, core, bt = operands(rows, n, r, torch.bfloat16, seed=2, strided=strided)
    want = reference(y, a, core, bt)
    twice = y.clone()
    _add_rank_r_(twice, a.contiguous(), core, bt, by_columns=False)
    got = y.clone()
    kernel.add_rank_r_(got, a, core, bt)
    assert_rounded_once_to_bf16(got, want)
    assert (got.double() - want).abs().mean() <= (twice.double() - want).abs().mean()


def test_bfloat16_rounding_is_torchs_bit_for_bit(kernel):
    """``-0 + 1·1·b`` is b exactly in float32 (-0, unlike +0, keeps a -0 summand's sign), so y holds b rounded to
    bf16: the same bits as torch's conversion in the 16-lane vector body and in the scalar tail (40 = 32 + 8
    columns), at ties to even, subnormals, overflow, ±inf and ±0; every NaN is the quiet 0x7FC0 (c10's scalar
    rounding; torch's vectorised cast writes 0xFFFF)."""
    tie_even, tie_odd = 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8  # exactly halfway between two bf16 neighbours
    special = [tie_even, -tie_even, tie_odd, -tie_odd, 1e-40, -3e-39, 2.0**-133, float("inf"), float("-inf"), 0.0,
               -0.0, 3.4e38, float("nan"), -float("nan")]
    gen = torch.Generator().manual_seed(5)
    row = torch.randn(40, generator=gen) * 10.0**torch.randint(-30, 30, (40,), generator=gen)
    b = torch.stack([row, row.roll(17), torch.tensor(special * 3)[:40], torch.tensor(special * 3)[:40].roll(30)])
    for bt in (b[i:i + 1].contiguous() for i in range(4)):  # (1, 40)
        y = torch.full((3, 40), -0.0, dtype=torch.bfloat16)
        kernel.add_rank_r_(y, torch.ones(3, 1), torch.ones(1, 1), bt)
        want = bt.expand(3, 40).to(torch.bfloat16)
        nan = want.isnan()
        assert torch.equal(y.isnan(), nan)
        assert torch.equal(y.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
        assert (y.view(torch.int16)[nan] == 0x7FC0).all()


def test_nan_and_inf_pass_through(kernel):
    y, a, core, bt = operands(2, 4, 2, torch.bfloat16, seed=3)
    y[0, 0], y[1, 1] = float("nan"), float("inf")
    kernel.add_rank_r_(y, a, core, bt)
    assert y[0, 0].isnan() and y[1, 1].isposinf()


# (case, how to break the call, message)
ERRORS = [
    ("shapes", lambda y, a, c, b: (y, a[:, :1], c, b), r"shapes do not chain .* a \[4, 1\]"),
    ("not-2d", lambda y, a, c, b: (y[None], a, c, b), r"must be 2-D, got shapes \[1, 4, 6\]"),
    ("y-fp16", lambda y, a, c, b: (y.half(), a, c, b), r"y must be float32 or bfloat16, got Half"),
    ("y-strided", lambda y, a, c, b: (torch.zeros(6, 4).T, a, c, b), r"y must be a contiguous CPU tensor"),
    ("a-bf16", lambda y, a, c, b: (y, a.bfloat16(), c, b), r"a must be float32, got BFloat16"),
    ("a-cols", lambda y, a, c, b: (y, torch.zeros(2, 4).T, c, b), r"a must have contiguous rows"),
    ("core-t", lambda y, a, c, b: (y, a, torch.zeros(2, 2).T, b), r"core must be contiguous"),
    ("rank", lambda y, a, c, b: (y, torch.zeros(4, 17), torch.zeros(17, 17), torch.zeros(17, 6)),
     r"rank must be in \[1, 16\], got 17"),
]


@pytest.mark.parametrize("case, breaks, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_operands_are_refused_by_name(kernel, case, breaks, message):
    args = breaks(*operands(4, 6, 2, torch.float32, seed=4))
    with pytest.raises(RuntimeError, match=message):
        kernel.add_rank_r_(*args)



# (case, rows, n, k, strided x): n off the 16/64-wide vector steps and the 512-float blocks, k up to q/k/v's 3r.
# k is summed four outputs at a time: 5 and 8 are a block of four and one, and two blocks.
PROJECT_CASES = [("tiny", 3, 5, 2, False), ("one-row", 1, 576, 6, False), ("k1", 7, 33, 1, False),
                 ("tails", 9, 1000, 3, False), ("wide", 300, 1536, 2, False), ("strided-x", 64, 100, 4, True),
                 ("k5-lanes", 4, 16, 5, False), ("k8-tail", 5, 47, 8, True)]


def activation(rows, n, dtype, gen, strided=False):
    x = torch.randn(rows, 2 * n if strided else n, generator=gen).to(dtype)  # (rows, n) or (rows, 2n)
    return x[:, n // 2:n // 2 + n] if strided else x  # rows strided, as a view of a wider input is


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case, rows, n, k, strided", PROJECT_CASES, ids=[c[0] for c in PROJECT_CASES])
def test_project_matches_float64(kernel, dtype, case, rows, n, k, strided):
    """``x vtᵀ`` read from x in its own dtype (a bf16 x is exact in float32), summed in float32."""
    gen = torch.Generator().manual_seed(11)
    x = activation(rows, n, dtype, gen, strided)
    vt = torch.randn(k, n, generator=gen) / n**0.5  # (k, n)
    got = kernel.project(x, vt)
    assert got.dtype == torch.float32 and got.shape == (rows, k)
    torch.testing.assert_close(got.double(), x.double() @ vt.double().T, rtol=1e-5, atol=1e-5)


# (case, rows, m = g's width, n = gx's width, r, strided h)
BACKWARD_CASES = [("tiny", 3, 5, 4, 2, False), ("one-row", 1, 576, 192, 2, False), ("r1", 7, 33, 17, 1, False),
                  ("r3-tails", 9, 1000, 70, 3, False), ("down", 300, 1536, 576, 2, False),
                  ("strided-h", 64, 100, 120, 2, True), ("r4-lanes", 3, 32, 31, 4, False),
                  ("r5-generic", 4, 40, 23, 5, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case, rows, m, n, r, strided", BACKWARD_CASES, ids=[c[0] for c in BACKWARD_CASES])
def test_backward_matches_float64(kernel, dtype, case, rows, m, n, r, strided):
    """``gx + (g utᵀ) ctᵀ vt`` rounded once into gx, and ``hᵀ (g utᵀ)``, against float64; without gx the same
    r x r gradient and nothing else."""
    gen = torch.Generator().manual_seed(12)
    g = torch.randn(rows, m, generator=gen).to(dtype)  # (rows, m)
    h = torch.randn(rows, 3 * r if strided else r, generator=gen)
    h = h[:, r:2 * r] if strided else h  # (rows, r)
    ut, vt = torch.randn(r, m, generator=gen) / m**0.5, torch.randn(r, n, generator=gen) / n**0.5
    ct = torch.randn(r, r, generator=gen)  # (r, r)
    gx = torch.randn(rows, n, generator=gen).to(dtype)  # (rows, n)
    gu = g.double() @ ut.double().T  # (rows, r)
    want_gx = gx.double() + gu @ ct.double().T @ vt.double()
    want_core = h.double().T @ gu  # (r, r)
    got_core = kernel.rank_r_backward_(gx, g, h, ut, ct, vt)
    torch.testing.assert_close(got_core.double(), want_core, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(gx.double(), want_gx, rtol=1e-5, atol=1e-5)
    else:
        assert_rounded_once_to_bf16(gx, want_gx)
    assert torch.equal(kernel.rank_r_backward_(None, g, h, ut, ct, vt), got_core)


def test_projection_falls_back_to_torch_where_the_kernel_does_not_read(kernel):
    """An fp16 x, a column-strided x and more than 16 stacked rows go to F.linear instead of raising."""
    gen = torch.Generator().manual_seed(13)
    vt = torch.randn(2, 8, generator=gen)
    for x in (torch.randn(4, 8, generator=gen).half(), torch.randn(8, 4, generator=gen).T):
        torch.testing.assert_close(_project(x, vt, kernel), x.float() @ vt.T)
    x, wide = torch.randn(4, 8, generator=gen), torch.randn(17, 8, generator=gen)
    torch.testing.assert_close(_project(x, wide, kernel), x @ wide.T)


# (case, how to break a valid project(x, vt) call, message)
PROJECT_ERRORS = [
    ("shapes", lambda x, vt: (x, vt[:, :3]), r"project: shapes do not chain .* x \[4, 6\], vt \[2, 3\]"),
    ("x-fp16", lambda x, vt: (x.half(), vt), r"project: x must be float32 or bfloat16, got Half"),
    ("x-cols", lambda x, vt: (torch.zeros(6, 4).T, vt), r"project: x must be a CPU tensor with contiguous rows"),
    ("vt-bf16", lambda x, vt: (x, vt.bfloat16()), r"project: vt must be float32, got BFloat16"),
    ("rank", lambda x, vt: (x, torch.zeros(17, 6)), r"project: rank must be in \[1, 16\], got 17"),
    ("not-2d", lambda x, vt: (x[None], vt), r"project: x, vt must be 2-D, got shapes \[1, 4, 6\], \[2, 6\]"),
]


@pytest.mark.parametrize("case, breaks, message", PROJECT_ERRORS, ids=[e[0] for e in PROJECT_ERRORS])
def test_project_refuses_bad_operands_by_name(kernel, case, breaks, message):
    gen = torch.Generator().manual_seed(14)
    with pytest.raises(RuntimeError, match=message):
        kernel.project(*breaks(torch.randn(4, 6, generator=gen), torch.randn(2, 6, generator=gen)))


# (case, how to break a valid rank_r_backward_(gx, g, h, ut, ct, vt) call, message)
BACKWARD_ERRORS = [
    ("gx-shape", lambda a: (a[0][:, :5], *a[1:]), r"gx must be \(rows, n\) = \(4, 6\), got \[4, 5\]"),
    ("gx-fp16", lambda a: (a[0].half(), *a[1:]), r"gx must be float32 or bfloat16, got Half"),
    ("g-fp16", lambda a: (a[0], a[1].half(), *a[2:]), r"g must be float32 or bfloat16, got Half"),
    ("h-bf16", lambda a: (*a[:2], a[2].bfloat16(), *a[3:]), r"h must be float32, got BFloat16"),
    ("ct-t", lambda a: (*a[:4], torch.zeros(2, 2).T, a[5]), r"ct must be contiguous"),
    ("chain", lambda a: (*a[:3], a[3][:, :4], *a[4:]), r"shapes do not chain .* ut \[2, 4\]"),
]


@pytest.mark.parametrize("case, breaks, message", BACKWARD_ERRORS, ids=[e[0] for e in BACKWARD_ERRORS])
def test_backward_refuses_bad_operands_by_name(kernel, case, breaks, message):
    gen = torch.Generator().manual_seed(15)
    args = (torch.randn(4, 6, generator=gen), torch.randn(4, 5, generator=gen), torch.randn(4, 2, generator=gen),
            torch.randn(2, 5, generator=gen), torch.randn(2, 2, generator=gen), torch.randn(2, 6, generator=gen))
    with pytest.raises(RuntimeError, match=f"rank_r_backward_: .*{message}"):
        kernel.rank_r_backward_(*breaks(args))

@pytest.fixture
def failed_build(monkeypatch):
    """A process in which building the kernel fails."""
    def boom():
        raise OSError("g++: not found")
    monkeypatch.setattr(cpu_kernel, "_state", {})
    monkeypatch.setattr(cpu_kernel, "_build", boom)


def test_off_never_builds(failed_build):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernel.load("off") is None


def test_auto_falls_back_once_with_the_reason(failed_build):
    with pytest.warns(RuntimeWarning, match=r"did not build, using torch ops instead .*OSError: g\+\+: not found"):
        assert cpu_kernel.load("auto") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernel.load("auto") is None


def test_on_raises_with_the_reason(failed_build):
    with pytest.raises(RuntimeError, match=r"cpu_kernel='on' but .* unavailable: OSError: g\+\+: not found"):
        cpu_kernel.load("on")


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match=r"`cpu_kernel` should be one of \['auto', 'on', 'off'\], .* 'yes'"):
        cpu_kernel.load("yes")
    with pytest.raises(ValueError, match=r"`cpu_kernel` should be one of \['auto', 'on', 'off'\], .* 'always'"):
        TinyLoRAConfig(cpu_kernel="always")


def test_build_name_follows_the_flags(monkeypatch):
    name = cpu_kernel.build_name()
    assert name == cpu_kernel.build_name() and name.startswith("tinylora_verl_cpu_")
    monkeypatch.setattr(cpu_kernel, "CFLAGS", ("-O2",))
    assert cpu_kernel.build_name() != name


def test_layout_keeps_the_kernel_only_for_float32_cpu_factors(kernel):
    gen = torch.Generator().manual_seed(5)
    U, V, S, P = torch.randn(6, 2, generator=gen), torch.randn(5, 2, generator=gen), torch.ones(2), torch.eye(2)[None]
    assert factor_layouts(U, S, V, P, torch.float32, kernel=kernel).kernel is kernel
    assert factor_layouts(U, S, V, P, torch.bfloat16, kernel=kernel).kernel is None
    assert factor_layouts(U, S, V, P, torch.float32).kernel is None


def factors(out_f, in_f, seed):
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out_f, 2, generator=gen, dtype=torch.float64))[0].float()  # (out, r)
    V = torch.linalg.qr(torch.randn(in_f, 2, generator=gen, dtype=torch.float64))[0].float()  # (in, r)
    S = torch.rand(2, generator=gen) * 3 + 1  # (r,)
    P = torch.randn(3, 2, 2, generator=gen) / 2**0.5  # (u, r, r)
    v = torch.randn(3, generator=gen)  # (u,)
    return U, S, V, P, v


@pytest.mark.parametrize("shared", [False, True], ids=["own-projection", "shared-projection"])
@pytest.mark.parametrize("out_f, in_f", [(7, 5), (512, 24), (24, 1536)])
def test_fused_linear_on_the_kernel_matches_the_dense_formula(kernel, shared, out_f, in_f):
    """Forward and x/v gradients of the fused linear with the kernel against the dense formula in float64."""
    U, S, V, P, v = factors(out_f, in_f, seed=6)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, in_f, generator=gen)
    W = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
    g = torch.randn(2, 3, out_f, generator=gen)
    layout = factor_layouts(U, S, V, P, torch.float32, kernel=kernel)
    xs, vs = x.clone().requires_grad_(True), v.clone().requires_grad_(True)
    h = shared_projection(xs, layout.Vt, kernel) if shared else None
    got = tinylora_linear(xs, W, None, vs, layout, h)
    got.backward(g)
    xd, vd = x.double().requires_grad_(True), v.double().requires_grad_(True)
    M = (vd[:, None, None] * P.double()).sum(0)  # (r, r)
    ref = xd @ (W.double() + U.double() @ torch.diag(S.double()) @ M @ V.double().T).T
    ref.backward(g.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vs.grad.double(), vd.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_model_on_and_off_the_kernel_agree(kernel, dtype, rtol):
    """A tiny Qwen2 (q/k/v biases, shared projections) gives the same logits and v-gradients with the kernel on
    and off; the layouts say which path ran."""
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(8))
    results = {}
    for mode in ("on", "off"):
        model = tiny_causal_lm("qwen2", dtype=dtype)
        adapter = inject_tinylora(model, TinyLoRAConfig(tie_size=3, init="normal", init_std=0.05, cpu_kernel=mode))
        logits = model(input_ids=ids).logits
        logits.float().square().mean().backward()
        kernels = {lay[0].kernel is kernel for lay in adapter.forwards.layouts.values()}
        assert kernels == {mode == "on"}
        results[mode] = (logits.detach().float(), torch.cat([p.grad for p in adapter.vectors]))
    torch.testing.assert_close(results["on"][0], results["off"][0], rtol=rtol, atol=rtol)
    torch.testing.assert_close(results["on"][1], results["off"][1], rtol=rtol * 10, atol=rtol)


def test_build_directory_follows_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert cpu_kernel.build_directory("k") == tmp_path / "k"


@pytest.mark.slow
def test_fresh_build_says_so_once_then_loads(tmp_path):
    """A real build into an empty extension cache, then a second process that only loads it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    code = ("import torch; from tinylora_verl.kernels import loader as cpu_kernel; op = cpu_kernel.load('on'); y = torch.zeros(2, 3); "
            "op.add_rank_r_(y, torch.ones(2, 2), torch.eye(2), torch.ones(2, 3)); print(y.sum().item())")
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-2000:]
    assert [r.stdout.strip() for r in runs] == ["12.0", "12.0"]
    assert "building the CPU kernel" in runs[0].stderr and "building" not in runs[1].stderr
    assert len(list(tmp_path.glob("tinylora_verl_cpu_*/*.so"))) == 1


def test_layouts_that_cannot_use_the_kernel_never_build_it(failed_build):
    """A bf16 model with hook_dtype=activation has only bf16 layouts: no build is tried, so no fallback warning."""
    model = tiny_causal_lm("qwen2", dtype=torch.bfloat16)
    inject_tinylora(model, TinyLoRAConfig(tie_size=3, hook_dtype="activation", cpu_kernel="on"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert cpu_kernel._state == {}
