"""SVD factors and projections against independent references (float64 SVD, the documented seeding scheme)."""

import hashlib
import subprocess
import sys

import pytest
import torch

from tinylora_verl.factors import canonicalize_signs, full_svd, mix, module_seed, projections, top_r_svd


def decaying(out: int, inp: int, seed: int, decay: float = 0.8) -> torch.Tensor:
    """A weight with a real checkpoint's shape of spectrum: a few separated top values, a slow power-law tail."""
    g = torch.Generator().manual_seed(seed)
    k = min(out, inp)
    U, _ = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(inp, k, generator=g, dtype=torch.float64))
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -decay
    return ((U * s) @ V.T).float()


def reference_factors(W: torch.Tensor, r: int):
    """float64 SVD with the canonical sign written out independently of the package."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    U, V = U[:, :r].clone(), Vh[:r].T.clone()
    for i in range(r):
        j = U[:, i].abs().argmax()
        if U[j, i] < 0:
            U[:, i], V[:, i] = -U[:, i], -V[:, i]
    return U, S[:r], V


SHAPES = [(8, 8), (40, 24), (24, 40), (600, 700), (1536, 576), (576, 1536)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
@pytest.mark.parametrize("fn", [top_r_svd, full_svd], ids=["top_r", "full"])
def test_factors_match_float64_reference(fn, shape):
    W = decaying(*shape, seed=sum(shape))
    U, S, V = fn(W, 2)
    Ur, Sr, Vr = reference_factors(W, 2)
    assert U.dtype == S.dtype == V.dtype == torch.float32
    assert (U.shape, S.shape, V.shape) == ((shape[0], 2), (2,), (shape[1], 2))
    torch.testing.assert_close(S.double(), Sr, rtol=1e-5, atol=1e-6)
    M = torch.randn(2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    delta, ref = (U.double() * S.double()) @ M @ V.double().T, (Ur * Sr) @ M @ Vr.T
    assert ((delta - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_svd_is_float32_from_any_dtype(dtype):
    W = decaying(64, 48, seed=3).to(dtype)
    U, S, V = top_r_svd(W, 2)
    assert U.dtype == torch.float32
    torch.testing.assert_close(S, torch.linalg.svdvals(W.float())[:2])


def test_canonical_sign_is_invariant_to_input_signs():
    W = decaying(30, 20, seed=4)
    U, S, V = full_svd(W, 2)
    flipped_U, flipped_V = canonicalize_signs(-U, -V)
    torch.testing.assert_close(flipped_U, U)
    torch.testing.assert_close(flipped_V, V)
    assert (U.gather(0, U.abs().argmax(0, keepdim=True)) > 0).all()


@pytest.mark.parametrize("r, shape", [(3, (2, 8)), (9, (8, 16)), (5, (4, 4))])
def test_rank_above_min_dim_is_an_error(r, shape):
    with pytest.raises(ValueError, match=rf"SVD rank r={r} exceeds min\(out, in\)={min(shape)}.*allowed: 1 <= r <= {min(shape)}"):
        top_r_svd(torch.ones(shape), r)


def test_non_matrix_is_an_error():
    with pytest.raises(ValueError, match=r"TinyLoRA needs a 2-D weight, got shape \(4, 4, 4\)"):
        top_r_svd(torch.ones(4, 4, 4), 2)


def test_projection_seeding_follows_the_documented_scheme():
    """P is N(0, 1/r) from sha256('tinylora:{seed}:{name}'), so it can be rebuilt without this package."""
    name, seed, u, r = "model.layers.3.mlp.up_proj", 11, 3, 2
    s = int.from_bytes(hashlib.sha256(f"tinylora:{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
    assert module_seed(seed, name) == s
    expected = torch.randn(u, r, r, generator=torch.Generator().manual_seed(s)) / r**0.5
    assert torch.equal(projections(seed, name, u, r), expected)
    assert not torch.equal(projections(seed, name.replace("3", "4"), u, r), expected)
    assert not torch.equal(projections(seed + 1, name, u, r), expected)


def test_projection_statistics():
    P = torch.cat([projections(0, f"m{i}", 64, 2).reshape(-1) for i in range(64)])
    assert abs(P.mean().item()) < 0.02
    assert abs(P.var().item() - 0.5) < 0.02


def test_mix_is_the_weighted_sum():
    P = projections(0, "x", 3, 2)
    v = torch.tensor([0.5, -1.0, 2.0])
    torch.testing.assert_close(mix(v, P), 0.5 * P[0] - P[1] + 2.0 * P[2])


_CHILD = """
import sys, torch
from tinylora_verl.factors import top_r_svd, projections
g = torch.Generator().manual_seed(123)
W = torch.randn(700, 900, generator=g) @ torch.diag(torch.linspace(3, 0.1, 900)) 
U, S, V = top_r_svd(W, 2)
torch.save({"U": U, "S": S, "V": V, "P": projections(5, "model.layers.0.self_attn.q_proj", 2, 2)}, sys.argv[1])
"""


def test_factors_identical_across_processes(tmp_path):
    """Two fresh interpreters (different hash seeds) rebuild bit-identical factors and projections."""
    outs = []
    for i, hashseed in enumerate(["1", "2"]):
        path = tmp_path / f"f{i}.pt"
        env = {"PYTHONHASHSEED": hashseed, "PATH": "/usr/bin:/bin"}
        subprocess.run([sys.executable, "-c", _CHILD, str(path)], check=True, env=env, timeout=300)
        outs.append(torch.load(path))
    for k in "USVP":
        assert torch.equal(outs[0][k], outs[1][k]), k
