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

import hashlib
import logging
import math

import torch

logger = logging.getLogger(__name__)

# Below this many columns a full SVD is as cheap as subspace iteration and needs no convergence test.
_FULL_SVD_MAX_DIM = 512
_OVERSAMPLE = 14
_MAX_ITERS = 100
# Residual ‖Avᵢ − σᵢuᵢ‖ relative to σ₁: 3e-6 is reachable in float32 and puts ΔW within ~4e-5 of a full SVD's
# on SmolLM2's weights (1e-6 often is not reachable: round-off in the products stalls above it).
_RESIDUAL_TOL = 3e-6


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


def top_r_svd(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-r SVD ``W ≈ U diag(S) Vᵀ`` by block subspace iteration with Rayleigh-Ritz, in float32.

    Iterates on a block of ``k = r + 14`` vectors (the oversampling makes convergence depend on
    ``σ_{k+1}/σ_r`` rather than the often tiny gap ``σ_{r+1}/σ_r``) until every one of the top-r Ritz pairs
    has residual ``‖Avᵢ − σᵢuᵢ‖ ≤ 3e-6 σ₁``. It is exact to float32 round-off like a full SVD, at the cost of a few
    ``(out x in) @ (in x k)`` products instead of an ``O(out·in·min(out, in))`` decomposition. Small weights and
    the rare non-converged case use the full SVD. The start block is drawn from a fixed seed on the CPU, so the
    result does not depend on the global RNG.

    Returns:
        ``U`` (out, r), ``S`` (r,), ``V`` (in, r), float32, canonical signs.
    """
    _check_rank(weight, r)
    A = weight.detach().to(torch.float32)  # (out, in)
    m, n = A.shape
    k = min(r + _OVERSAMPLE, m, n)
    if min(m, n) <= _FULL_SVD_MAX_DIM or 2 * k >= min(m, n):
        return full_svd(A, r)
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)
    Z = torch.randn(n, k, generator=gen, dtype=torch.float32).to(A.device)  # (in, k)
    Q, _ = torch.linalg.qr(A @ Z)  # (out, k)
    for _ in range(_MAX_ITERS):
        Z, _ = torch.linalg.qr(A.T @ Q)  # (in, k)
        Q, _ = torch.linalg.qr(A @ Z)  # (out, k)
        B = Q.T @ A  # (k, in)
        Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
        U = Q @ Ub[:, :r]  # (out, r)
        V = Vh[:r].T  # (in, r)
        # Aᵀuᵢ = σᵢvᵢ holds by construction of the Ritz pairs; Avᵢ = σᵢuᵢ is the test.
        residual = (A @ V - U * S[:r]).norm(dim=0).max()  # scalar
        if residual <= _RESIDUAL_TOL * S[0]:
            U, V = canonicalize_signs(U, V)
            return U.contiguous(), S[:r].contiguous(), V.contiguous()
    logger.warning("top_r_svd: subspace iteration did not converge for a %dx%d weight; using a full SVD", m, n)
    return full_svd(A, r)


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
