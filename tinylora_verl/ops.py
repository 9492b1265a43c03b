"""The adapter's forward/backward arithmetic: ΔW·x added to a linear's output in place, with a hand-written backward.

For one adapted linear with input ``x`` and base output ``y = x Wᵀ (+ b)``::

    h  = x V                      (tokens, r)      shared by modules that read the same x (q/k/v, gate/up)
    y ← y + h (Σ M)ᵀ Uᵀ           (tokens, out)    M = Σᵢ vᵢ Pᵢ, ΔW = U Σ M Vᵀ

Why not plain autograd: every op of the hook becomes an autograd node and its own pass over a (tokens, out) or
(tokens, in) tensor. The overhead benchmark (bench/overhead.py) is bound by those passes and by per-op dispatch,
not by FLOPs (the GEMMs are rank r = 2). Here the update is one in-place ``addmm_`` (no (tokens, out) temporary,
no separate add), ``M`` and ``Σ M`` are formed without autograd, the backward is three thin GEMMs, and a tie of
modules reading one input computes ``x [V₁ V₂ V₃]`` as one GEMM (and, in backward, one rank-3r update of the
input gradient instead of three rank-r updates and two adds).

Layout: the thin factors enter every GEMM as ``(r, dim)`` row-major (``Vᵀ``, ``Uᵀ``), i.e. as the transposed
operand. With torch 2.13's CPU BLAS a (tokens, dim) x (dim, 2) product is ~4x faster that way than with the
(dim, 2) factor contiguous (16 vs 65 µs at 256 x 576; bench/overhead.py measures the whole effect).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Modules that HF decoder layers call on the same input tensor: their x V products can share one GEMM.
SHARED_INPUT_TYPES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def shared_input_groups(names: list[str]) -> list[list[str]]:
    """Groups of ≥ 2 module names under one parent whose types appear together in :data:`SHARED_INPUT_TYPES`.

    Only a candidate: the hooks still check at run time that the modules received the very same tensor.
    """
    by_parent: dict[tuple[str, int], list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        for k, types in enumerate(SHARED_INPUT_TYPES):
            if leaf in types:
                by_parent.setdefault((parent, k), []).append(name)
    return [sorted(g, key=lambda n: SHARED_INPUT_TYPES[k].index(n.rpartition(".")[2]))
            for (_, k), g in by_parent.items() if len(g) > 1]


def mixed_core(v: torch.Tensor, P: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``Σ M = diag(S) Σᵢ vᵢ Pᵢ`` (r, r) in P's dtype (float32 buffers), from ``v`` (u,), ``P`` (u, r, r), ``S`` (r,)."""
    u, r, _ = P.shape
    M = (v.detach().to(P.dtype)[None, :] @ P.reshape(u, r * r)).view(r, r)  # (r, r)
    return S[:, None] * M  # (r, r)


class AddLowRankUpdate(torch.autograd.Function):
    """``y ← y + h (Σ M)ᵀ Uᵀ`` in place, differentiable in ``y``, ``h`` and ``v``.

    Forward in ``h``'s dtype: float32 (then cast once and added, as a float32 ΔW·x would be) or the output's own
    dtype (``addmm_`` into ``y``). Backward, with ``g = ∂L/∂y`` and ``gU = g U`` (tokens, r)::

        ∂L/∂h = gU (Σ M),   ∂L/∂(Σ M) = gUᵀ h,   ∂L/∂vᵢ = Σⱼₖ Sⱼ (gUᵀ h)ⱼₖ (Pᵢ)ⱼₖ

    ``y`` is updated in place and marked dirty, so autograd raises if anything had saved it for its backward.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, h: torch.Tensor, v: torch.Tensor, P: torch.Tensor, S: torch.Tensor,
                Ut: torch.Tensor) -> torch.Tensor:
        SM = mixed_core(v, P, S)  # (r, r)
        dt = h.dtype
        Ut = Ut.to(dt)  # (r, out)
        h2 = h @ SM.T.to(dt)  # (tokens, r)
        y2d = y.view(-1, y.shape[-1])  # (tokens, out)
        if y.dtype == dt:
            y2d.addmm_(h2, Ut)
        else:
            y2d.add_((h2 @ Ut).to(y.dtype))  # (tokens, out)
        ctx.mark_dirty(y)
        ctx.save_for_backward(h, v, P, S, Ut, SM)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h, v, P, S, Ut, SM = ctx.saved_tensors
        dt = h.dtype
        need_h, need_v = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = grad_v = None
        if need_h or need_v:
            gU = F.linear(g.reshape(-1, g.shape[-1]).to(dt), Ut)  # (tokens, r)
            if need_h:
                grad_h = gU @ SM.to(dt)  # (tokens, r)
            if need_v:
                u, r, _ = P.shape
                grad_SM = gU.T.to(SM.dtype) @ h.to(SM.dtype)  # (r, r)
                grad_v = (P.reshape(u, r * r) @ (S[:, None] * grad_SM).reshape(-1)).to(v.dtype)  # (u,)
        return g, grad_h, grad_v, None, None, None


def add_low_rank_update(y: torch.Tensor, h: torch.Tensor, v: torch.Tensor, P: torch.Tensor, S: torch.Tensor,
                        Ut: torch.Tensor) -> torch.Tensor:
    """Functional form of :class:`AddLowRankUpdate` with ``Ut = Uᵀ`` (r, out) contiguous (modifies ``y``)."""
    return AddLowRankUpdate.apply(y, h, v, P, S, Ut)


def input_projection(x: torch.Tensor, Vt: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``h = x V`` (tokens, k) from ``Vt = Vᵀ`` (k, in) contiguous, in ``dtype`` (default: float32), through plain
    autograd (one GEMM node whose backward is the rank-k input-gradient update)."""
    dt = dtype or torch.float32
    x2d = x.reshape(-1, x.shape[-1])  # (tokens, in)
    return F.linear(x2d.to(dt), Vt.to(dt))  # (tokens, k)


__all__ = ["AddLowRankUpdate", "SHARED_INPUT_TYPES", "add_low_rank_update", "input_projection", "mixed_core",
           "shared_input_groups"]
