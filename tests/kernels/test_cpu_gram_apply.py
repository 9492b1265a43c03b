"""The block Lanczos's products with the Gram as one C++ pass (``csrc/gram_apply.cpp``): against float64 GEMMs,
independent of the thread count, used by ``top_r_svd`` under ``cpu_kernel``, and its errors."""

import pytest
import torch

from tinylora_verl import TinyLoRAConfig, inject_tinylora
from tinylora_verl.core import factors
from tinylora_verl.kernels import loader as cpu_kernel
from tinylora_verl.core.factors import top_r_svd_batch

from tests.core.test_factors import decaying, delta_rel, reference_factors


@pytest.fixture(scope="module")
def kernel():
    return cpu_kernel.load("on")


def reference(A: torch.Tensor, X: torch.Tensor, tall: bool) -> torch.Tensor:
    """``X AᵀA`` or ``X A Aᵀ`` in float64."""
    A, X = A.double(), X.double()
    return X @ A.mT @ A if tall else X @ A @ A.mT


def operands(nb: int, out_f: int, in_f: int, b: int, tall: bool, seed: int, pad: int = 0):
    """Seeded ``A`` (nb, out, in) and ``X`` (nb, b, s); ``pad`` extra rows make X a strided slice of a bigger block
    basis, as the Lanczos passes it."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(nb, out_f, in_f, generator=g)
    basis = torch.randn(nb, b + pad, in_f if tall else out_f, generator=g)
    return A, basis[:, pad:]


# (case, batch, out, in, block rows, tall, extra basis rows). 1100 and 1300 rows cross the kernel's 512-row chunks;
# SmolLM2's shapes at their batch sizes; b from 1 to the maximum of 8.
CASES = [
    ("tall-one", 1, 40, 24, 2, True, 0),
    ("tall-chunks", 1, 1100, 700, 2, True, 0),
    ("tall-smollm2-mlp", 2, 1536, 576, 2, True, 0),
    ("tall-smollm2-q", 6, 576, 576, 2, True, 6),
    ("tall-b1", 3, 300, 64, 1, True, 0),
    ("tall-b8", 2, 600, 100, 8, True, 3),
    ("wide-smollm2-kv", 18, 192, 576, 2, False, 0),
    ("wide-smollm2-down", 2, 576, 1536, 2, False, 4),
    ("wide-chunks", 1, 1300, 1400, 3, False, 0),
    ("wide-b8", 2, 64, 900, 8, False, 0),
]


@pytest.mark.parametrize("case, nb, out_f, in_f, b, tall, pad", CASES, ids=[c[0] for c in CASES])
def test_gram_apply_matches_float64(kernel, case, nb, out_f, in_f, b, tall, pad):
    """Within float32 round-off of the float64 product, and no further from it than torch's two GEMMs."""
    A, X = operands(nb, out_f, in_f, b, tall, seed=len(case), pad=pad)
    want = reference(A, X, tall)
    got = kernel.gram_apply(A, X, tall)
    assert got.shape == X.shape and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    gemm = factors._gram_apply(A, X, tall, threads=1)
    assert (got.double() - want).norm() <= 2 * (gemm.double() - want).norm()


@pytest.mark.parametrize("tall", [True, False], ids=["tall", "wide"])
def test_gram_apply_does_not_depend_on_the_thread_count(kernel, tall):
    """The rows are cut into fixed chunks summed in order: bit for bit the same on 1 and 2 threads."""
    A, X = operands(3, 1100, 600, 2, tall, seed=5)
    with factors._torch_threads(1):
        one = kernel.gram_apply(A, X, tall)
    with factors._torch_threads(2):
        two = kernel.gram_apply(A, X, tall)
    assert torch.equal(one, two)


def test_gram_apply_of_an_empty_batch(kernel):
    got = kernel.gram_apply(torch.empty(0, 5, 4), torch.empty(0, 2, 4), True)
    assert got.shape == (0, 2, 4)


ERRORS = [
    ("float64", lambda: (torch.ones(1, 8, 4, dtype=torch.float64), torch.ones(1, 2, 4), True),
     r"gram_apply: a and x must be float32, got Double and Float"),
    ("2-D", lambda: (torch.ones(8, 4), torch.ones(1, 2, 4), True), r"gram_apply: a \(B, out, in\) and x"),
    ("wrong side", lambda: (torch.ones(1, 8, 4), torch.ones(1, 2, 8), True),
     r"gram_apply: x must be \(1, b, 4\) for a of shape \[1, 8, 4\] \(tall=1\), got \[1, 2, 8\]"),
    ("batch", lambda: (torch.ones(2, 8, 4), torch.ones(1, 2, 8), False), r"gram_apply: x must be \(2, b, 8\)"),
    ("block 9", lambda: (torch.ones(1, 8, 4), torch.ones(1, 9, 4), True),
     r"gram_apply: a block of 9 rows; allowed: 1 to 8"),
    ("strided", lambda: (torch.ones(1, 4, 8).mT, torch.ones(1, 2, 4), True), r"gram_apply: a and x need unit inner"),
]


@pytest.mark.parametrize("case, args, match", ERRORS, ids=[e[0] for e in ERRORS])
def test_gram_apply_errors(kernel, case, args, match):
    with pytest.raises(RuntimeError, match=match):
        kernel.gram_apply(*args())


def spy(monkeypatch) -> list:
    """Record every kernel ``_gram_apply`` is handed (None: the two GEMMs)."""
    seen, real = [], factors._gram_apply

    def recording(A, X, tall, threads, kernel=None):
        seen.append(kernel)
        return real(A, X, tall, threads, kernel)

    monkeypatch.setattr(factors, "_gram_apply", recording)
    return seen


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_top_r_svd_batch_takes_the_kernel_under_cpu_kernel(kernel, monkeypatch, mode):
    """``auto``/``on`` run the Lanczos on the kernel, ``off`` on torch's GEMMs; both within 1e-5 of float64."""
    seen = spy(monkeypatch)
    weights = [decaying(400, 400, seed=i) for i in range(3)] + [decaying(300, 500, seed=9)]
    got = top_r_svd_batch(weights, 2, cpu_kernel=mode)
    assert seen and all(k is (None if mode == "off" else kernel.gram_apply) for k in seen)
    for W, (U, S, V) in zip(weights, got):
        assert delta_rel(U, S, V, *reference_factors(W, 2)) < 1e-5


def test_kernel_and_gemm_factors_agree(kernel):
    """The two paths differ only in round-off of the Krylov products: ΔW agrees far inside the 1e-4 goal."""
    weights = [decaying(576, 576, seed=3), decaying(1536, 576, seed=4), decaying(192, 576, seed=5)]
    on, off = top_r_svd_batch(weights, 2, cpu_kernel="on"), top_r_svd_batch(weights, 2, cpu_kernel="off")
    for a, b in zip(on, off):
        assert delta_rel(*a, *(t.double() for t in b)) < 1e-5


def test_inject_passes_its_cpu_kernel_policy(monkeypatch):
    """``inject_tinylora`` hands its config's ``cpu_kernel`` to the SVDs: ``off`` never loads the kernel."""
    modes = []
    real = factors._cpu_gram_kernel
    monkeypatch.setattr(factors, "_cpu_gram_kernel", lambda mode: modes.append(mode) or real(mode))
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(500, 300, bias=False))
    with torch.no_grad():
        model.q_proj.weight.copy_(decaying(300, 500, seed=1))
    adapter = inject_tinylora(model, TinyLoRAConfig(target_modules=["q_proj"], budget=1, cpu_kernel="off"))
    assert modes == ["off"]
    U, S, V, _ = adapter.factors("q_proj")
    assert delta_rel(U, S, V, *reference_factors(model.q_proj.weight.detach(), 2)) < 1e-5


def test_small_weights_never_load_the_kernel(monkeypatch):
    """Below 2^17 elements A is re-read from cache anyway: the GEMMs run, and no build is tried for a tiny model."""
    monkeypatch.setattr(factors, "_cpu_gram_kernel", lambda mode: pytest.fail("loaded the kernel"))
    seen = spy(monkeypatch)
    W = decaying(400, 327, seed=2)
    assert W.numel() < factors._KERNEL_MIN_NUMEL
    U, S, V = top_r_svd_batch([W], 2, cpu_kernel="on")[0]
    assert seen and set(seen) == {None}
    assert delta_rel(U, S, V, *reference_factors(W, 2)) < 1e-5


def test_top_r_svd_rejects_an_unknown_cpu_kernel():
    match = r"`cpu_kernel` should be one of \['auto', 'on', 'off'\], but the value passed is 'fast'"
    with pytest.raises(ValueError, match=match):
        top_r_svd_batch([decaying(100, 80, seed=0)], 2, cpu_kernel="fast")
