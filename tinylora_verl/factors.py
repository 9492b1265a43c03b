"""Frozen factors of TinyLoRA: the top-r SVD of each target weight and the fixed random projections.

For a weight ``W`` (out x in), :func:`top_r_svd` returns ``U`` (out, r), ``S`` (r,), ``V`` (in, r) with
``W ≈ U diag(S) Vᵀ``, computed in float32 whatever the weight's dtype, with a canonical sign, and
:func:`projections` returns ``P`` (u, r, r) with entries ``N(0, 1/r)``, seeded from ``(seed, module name)``.

Why the sign matters: an SVD is unique only up to flipping ``(u_i, v_i)`` together, and
``U D Σ M D Vᵀ ≠ U Σ M Vᵀ`` for a random ``M`` and a sign matrix ``D``. The canonical sign (the entry of
largest magnitude in each column of ``U`` is positive) makes the same base weights and seed always give the
same ΔW, so a saved ``v`` means the same thing on any machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from typing import Optional

import torch

logger = logging.getLogger(__name__)

# Below this many rows or columns a float64 full SVD is cheaper than setting up the Krylov iteration.
_FULL_SVD_MAX_DIM = 32
# Block size 2: a pair of nearly equal singular values (σ₃/σ₂ = 0.9976 in SmolLM2's layer 16 up_proj) is resolved
# inside one block instead of needing a polynomial that separates them; blocks of 2 rows also hit MKL's fast
# small-matrix kernels, whereas (n x b) column blocks with 2 <= b <= 8 take a path about 5x slower.
_BLOCK = 2
# Ritz vectors beyond the top r handed to the float64 Rayleigh-Ritz step: it resolves σᵣ against σᵣ₊₁ exactly,
# so the Krylov space only has to contain vᵣ's cluster, and the gap that matters is σᵣ against σᵣ₊₇, not σᵣ₊₁.
_RITZ_EXTRA = 6
# Residual ‖Gvᵢ − θᵢvᵢ‖ of the top-r Ritz pairs relative to θ₁ = σ₁²: 2e-6 puts ΔW within 1e-5 of a float64
# SVD's on every SmolLM2 weight (5e-6: 2.7e-5, 1e-5: 3.5e-5, for ~2% less time; a float32 full SVD is up to
# 1e-4 off). Unlike the residual of float32 subspace iteration it is reachable: it is computed from T, not A.
_RESIDUAL_TOL = 2e-6
# Krylov dimension at which to give up and use a full SVD (SmolLM2 needs at most ~70).
_MAX_KRYLOV_DIM = 1024
# A new block this much smaller than G applied to the last one is round-off: the Krylov space is invariant (exactly
# low rank, or as many equal singular values as the block carries) and cannot be extended.
_BREAKDOWN = 1e-5
# The iteration is hundreds of tiny ops; with several OpenMP threads each pays a fork-join, and on a loaded
# machine a spin-wait: a 576 x 1536 weight took 9 s with 2 threads and 0.02 s with 1. So it runs on one thread,
# except the products with A of a weight this large (Qwen2.5-7B's MLPs), where threads pay off.
_THREADED_MIN_NUMEL = 1 << 24
# Rows of A converted to float64 at a time in the final products (a 18944 x 3584 weight would be 543 MB).
_CHUNK_ROWS = 2048


def _check_rank(weight: torch.Tensor, r: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"TinyLoRA needs a 2-D weight, got shape {tuple(weight.shape)}")
    if r > min(weight.shape):
        raise ValueError(
            f"SVD rank r={r} exceeds min(out, in)={min(weight.shape)} of a weight with shape {tuple(weight.shape)}; "
            f"allowed: 1 <= r <= {min(weight.shape)}"
        )


def canonicalize_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair ``(U[:, i], V[:, i])`` so the entry of largest magnitude in ``U[:, i]`` is positive."""
    idx = U.abs().argmax(dim=0)  # (r,)
    signs = torch.sign(U.gather(0, idx[None, :])).squeeze(0)  # (r,)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, V * signs


def full_svd(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r factors from a full ``torch.linalg.svd`` in float32 (the reference; what peers do per module)."""
    _check_rank(weight, r)
    A = weight.detach().to(torch.float32)  # (out, in)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    U, V = canonicalize_signs(U[:, :r], Vh[:r].T)
    return U.contiguous(), S[:r].contiguous(), V.contiguous()


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run the block with ``n`` intra-op threads, then restore the caller's setting."""
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != old:
            torch.set_num_threads(old)


def _gram_apply(A: torch.Tensor, X: torch.Tensor, tall: bool, threads: int) -> torch.Tensor:
    """``X G`` for rows ``X`` (b, s) and the Gram ``G`` = AᵀA (tall) or AAᵀ (wide) of the small side s."""
    with _torch_threads(threads):
        return (X @ A.T) @ A if tall else (X @ A) @ A.T  # (b, s)


def _block_lanczos(A: torch.Tensor, r: int, k: int, tall: bool, threads: int) -> Optional[torch.Tensor]:
    """Top k Ritz vectors (k, s) of the small-side Gram by block Lanczos, or None if not converged.

    Basis vectors are rows of ``Qt`` (row-major blocks are the fast case, see ``_BLOCK``), reorthogonalized twice
    against all previous ones (classical Gram-Schmidt twice: with one pass float32 loses orthogonality and
    SmolLM2's weights took up to 99 steps, some to wrong vectors). The coefficients of that orthogonalization
    are the projected matrix T = Qᵀ G Q, so the residual of a Ritz pair ``(θ, Qᵀw)`` is ``‖R w_last‖`` with R
    the last block's QR factor, no extra product.
    """
    s, b = min(A.shape), _BLOCK
    steps = min(_MAX_KRYLOV_DIM, s) // b - 1
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)
    Q0, _ = torch.linalg.qr(torch.randn(s, b, generator=gen, dtype=torch.float32))  # (s, b)
    Qt = torch.empty(b * (steps + 1), s, device=A.device)  # (d_max, s) basis rows
    # T grows by doubling: zeroing a d_max² buffer (1.3 MB for SmolLM2) cost as much as 5 steps.
    T = torch.zeros(64, 64, device=A.device)  # (≥ d, ≥ d)
    Qt[:b] = Q0.T.to(A.device)
    Qj = Qt[:b]  # (b, s)
    check, last = -(-k // b), None  # the first depth with k Ritz vectors
    for j in range(1, steps + 1):
        d = b * j
        Qd = Qt[:d]  # (d, s)
        W = _gram_apply(A, Qj, tall, threads)  # (b, s)
        scale = W.norm()  # scalar
        C = W @ Qd.T  # (b, d)
        W = torch.addmm(W, C, Qd, alpha=-1)  # (b, s)
        C2 = W @ Qd.T  # (b, d)
        W = torch.addmm(W, C2, Qd, alpha=-1)  # (b, s)
        Qn, R = torch.linalg.qr(W.T)  # (s, b), (b, b)
        Qt[d:d + b] = Qn.T
        Qj = Qt[d:d + b]  # (b, s)
        if d > T.shape[0]:
            T = torch.nn.functional.pad(T, (0, T.shape[0], 0, T.shape[0]))
        T[d - b:d, :d] = C + C2  # this block's row of T up to the diagonal: the lower triangle eigh reads
        breakdown = (R.diagonal().abs().min() <= _BREAKDOWN * scale).item()
        if breakdown and d < k:
            return None
        if j < check and j < steps and not breakdown:
            continue
        theta, w = torch.linalg.eigh(T[:d, :d], UPLO="L")  # ascending
        w = w[:, -k:].flip(1)  # (d, k) top first
        # Only the top r pairs: a block of 2 already carries vᵣ₊₁ along when σᵣ₊₁ ≈ σᵣ.
        res = ((R @ w[d - b:, :r]).norm(dim=0).max() / theta[-1]).item()
        if res <= _RESIDUAL_TOL:
            return w.T @ Qd  # (k, s)
        if breakdown:
            return None
        # The residual falls geometrically with the depth: jump to the predicted depth, at most 8 steps ahead,
        # so the d x d eigh runs a few times rather than every step.
        if last is not None and res < last[1]:
            rate = math.log(res / last[1]) / (j - last[0])
            check = j + max(1, min(8, math.ceil(math.log(_RESIDUAL_TOL / res) / rate)))
        else:
            check = j + 3
        last = (j, res)
    return None


def _rayleigh_ritz64(A: torch.Tensor, B: torch.Tensor, r: int, tall: bool, threads: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of ``A`` restricted to the row span of ``B`` (k, s), all in float64."""
    B = torch.linalg.qr(B.double().T)[0].T  # (k, s) orthonormal in float64
    # Y = B Aᵀ (tall) or B A (wide) in float64, a block of rows of A at a time.
    with _torch_threads(threads):
        if tall:
            Y = torch.cat([B @ rows.double().T for rows in A.split(_CHUNK_ROWS)], dim=1)  # (k, out)
        else:
            chunks = zip(B.split(_CHUNK_ROWS, dim=1), A.split(_CHUNK_ROWS))
            Y = sum(Bc @ rows.double() for Bc, rows in chunks)  # (k, in)
    # SVD of Yᵀ through the k x k Gram Y Yᵀ: in float64 squaring σ costs nothing that matters, and it is a
    # third of the time of torch.linalg.svd on the tall (big, k) matrix.
    theta, Z = torch.linalg.eigh(Y @ Y.T)  # (k,), (k, k) ascending
    Z, S = Z[:, -r:].flip(1), theta[-r:].flip(0).clamp_min(0).sqrt()  # (k, r), (r,)
    big, small = (Z.T @ Y).T / S.clamp_min(torch.finfo(S.dtype).tiny), B.T @ Z  # (big side, r), (small side, r)
    return (big, S, small) if tall else (small, S, big)


def top_r_svd(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-r SVD ``W ≈ U diag(S) Vᵀ``: float32 block Lanczos, then a float64 Rayleigh-Ritz step.

    Block Lanczos (block 2, full reorthogonalization) on the Gram of the smaller side, ``AᵀA`` or ``AAᵀ``, applied
    as two products with ``A`` (never formed), runs until the top-r Ritz pairs have residual
    ``‖Gvᵢ − θᵢvᵢ‖ ≤ 2e-6 θ₁``. Krylov needs ~1/√gap steps where subspace iteration needs ~1/gap, which is what
    matters on real checkpoints whose spectra are flat (σ₁₇/σ₂ ≈ 0.9 in SmolLM2's MLPs). The float32 iteration
    only has to find a subspace containing the top singular vectors; their separation, which for nearly
    equal σ₂ ≈ σ₃ float32 round-off cannot resolve (a float32 full SVD is up to 1e-4 off in ΔW), is done by
    a Rayleigh-Ritz step on the top r + 6 Ritz vectors with ``A`` in float64. Tiny weights use a float64 full
    SVD; a rank above a quarter of min(out, in) and the unconverged case use a float32 one. The start block
    comes from a fixed seed on the CPU, so the result does not depend on the global RNG.

    Returns:
        ``U`` (out, r), ``S`` (r,), ``V`` (in, r), float32, canonical signs.
    """
    _check_rank(weight, r)
    A = weight.detach().to(torch.float32)  # (out, in)
    m, n = A.shape
    tall, k = m >= n, r + _RITZ_EXTRA
    if min(m, n) <= _FULL_SVD_MAX_DIM:
        U, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
        U, V = U[:, :r], Vh[:r].T
    elif 4 * k > min(m, n):
        return full_svd(A, r)
    else:
        threads = torch.get_num_threads() if A.numel() >= _THREADED_MIN_NUMEL else 1
        with _torch_threads(1):
            B = _block_lanczos(A, r, k, tall, threads)  # (k, s) Ritz vectors of the small side
            if B is not None:
                U, S, V = _rayleigh_ritz64(A, B, r, tall, threads)
        if B is None:
            logger.warning("top_r_svd: block Lanczos did not converge for a %dx%d weight (or broke down: exactly low "
                           "rank or repeated singular values); using a full SVD", m, n)
            return full_svd(A, r)
    U, V = canonicalize_signs(U.float(), V.float())
    return U.contiguous(), S[:r].float().contiguous(), V.contiguous()


def module_seed(seed: int, module_name: str) -> int:
    """A 63-bit seed from ``(seed, module name)``: the same on any device, process or traversal order."""
    digest = hashlib.sha256(f"tinylora:{seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def projections(seed: int, module_name: str, u: int, r: int) -> torch.Tensor:
    """Fixed random projections ``P`` (u, r, r) with i.i.d. ``N(0, 1/r)`` entries.

    The paper does not state P's distribution; ``N(0, 1/r)`` is what every public implementation uses.
    Drawn on the CPU from an explicit generator, then moved by the caller, so every device agrees.
    """
    gen = torch.Generator(device="cpu").manual_seed(module_seed(seed, module_name))
    return torch.randn(u, r, r, generator=gen, dtype=torch.float32) / math.sqrt(r)  # (u, r, r)


def mix(v: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``M = Σᵢ vᵢ Pᵢ`` (r, r) in float32 from ``v`` (u,) and ``P`` (u, r, r)."""
    return torch.einsum("u,urs->rs", v.to(torch.float32), P)  # (r, r)


def dense_delta(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``ΔW = U diag(S) M Vᵀ`` (out, in) in float32."""
    return (U * S) @ M @ V.T  # (out, in)
