"""The adapter's forward/backward arithmetic: ΔW·x added to a linear's output in place, with a hand-written backward.

For one adapted linear with input ``x`` and base output ``y = x Wᵀ (+ b)``::

    h  = x V                      (tokens, r)      shared by modules that read the same x (q/k/v, gate/up)
    y ← y + h (Σ M)ᵀ Uᵀ           (tokens, out)    M = Σᵢ vᵢ Pᵢ, ΔW = U Σ M Vᵀ

Why not plain autograd: every op of the hook becomes an autograd node and its own pass over a (tokens, out) or
(tokens, in) tensor. The overhead benchmark (bench/overhead.py) is bound by those passes and by per-op dispatch,
not by FLOPs (the GEMMs are rank r = 2). Here the update is one in-place ``addmm_`` (no (tokens, out) temporary,
no separate add), ``(Σ M)ᵀ`` is one matrix-vector product outside autograd (from a :class:`FactorLayout` the
adapter caches per module), the backward is three thin GEMMs, a tie of modules reading one input computes
``x [V₁ V₂ V₃]`` as one GEMM (and, in backward, one rank-3r update of the input gradient instead of three rank-r
updates and two adds), and a module that shares no input projects it inside the same node.

Layout: the thin factors enter every GEMM as ``(r, dim)`` row-major (``Vᵀ``, ``Uᵀ``), i.e. as the transposed
operand. With torch 2.13's CPU BLAS a (tokens, dim) x (dim, 2) product is ~4x faster that way than with the
(dim, 2) factor contiguous (16 vs 65 µs at 256 x 576; bench/overhead.py measures the whole effect).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

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


class FactorLayout(NamedTuple):
    """A module's frozen factors laid out for the hook, in the dtype the update is computed in.

    ``Ut = Uᵀ`` (r, out) and ``Vt = Vᵀ`` (r, in) contiguous; ``PSt`` (r·r, u) float32 with
    ``PSt @ v = vec((Σ M)ᵀ)``, ``PSt[(k, j), i] = Sⱼ (Pᵢ)ⱼₖ``, so the mixed core is one matrix-vector product.
    ``by_columns``: add the update as r broadcast multiply-adds instead of one GEMM (see :func:`factor_layouts`).
    """

    Ut: torch.Tensor
    Vt: torch.Tensor
    PSt: torch.Tensor
    by_columns: bool


def factor_layouts(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, P: torch.Tensor,
                   dtype: torch.dtype) -> FactorLayout:
    """:class:`FactorLayout` from ``U`` (out, r), ``S`` (r,), ``V`` (in, r), ``P`` (u, r, r)."""
    u, r, _ = P.shape
    PSt = (S[None, :, None] * P).transpose(1, 2).reshape(u, r * r).T.contiguous()  # (r·r, u)
    # MKL's float32 GEMM with K = r is ~3x slower on rows of a multiple of 512 floats (79 vs 30 µs at 256 x 1536,
    # 179 vs 58 at 256 x 3584; 13 µs at 256 x 576 either way): there r broadcast multiply-adds are faster.
    by_columns = U.device.type == "cpu" and dtype == torch.float32 and U.shape[0] % 512 == 0
    return FactorLayout(U.T.to(dtype).contiguous(), V.T.to(dtype).contiguous(), PSt, by_columns)


def _core_t(v: torch.Tensor, PSt: torch.Tensor, r: int) -> torch.Tensor:
    """``(Σ M)ᵀ = (diag(S) Σᵢ vᵢ Pᵢ)ᵀ`` (r, r) in float32 (called inside forward: no graph is recorded)."""
    return torch.mv(PSt, v if v.dtype is PSt.dtype else v.to(PSt.dtype)).view(r, r)  # (r, r)


def _add_rank_r_(y: torch.Tensor, h2d: torch.Tensor, core_t: torch.Tensor, Ut: torch.Tensor,
                 by_columns: bool) -> None:
    """``y ← y + h (Σ M)ᵀ Uᵀ`` in place, for ``y`` (..., out), ``h2d`` (tokens, r), ``Ut`` (r, out)."""
    h2 = torch.mm(h2d, core_t if core_t.dtype is h2d.dtype else core_t.to(h2d.dtype))  # (tokens, r)
    y2d = y.view(-1, y.shape[-1])  # (tokens, out)
    if y.dtype is not Ut.dtype:
        y2d.add_(torch.mm(h2, Ut).to(y.dtype))
    elif by_columns:
        for j in range(h2.shape[1]):
            y2d.addcmul_(h2[:, j:j + 1], Ut[j:j + 1])
    else:
        y2d.addmm_(h2, Ut)


def _grads(g: torch.Tensor, h2d: torch.Tensor, v_dtype: torch.dtype, PSt: torch.Tensor, Ut: torch.Tensor,
           need_v: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``gU = g U`` (tokens, r) and ``∂L/∂v = PStᵀ vec(hᵀ gU)`` (u,), the latter in float32 then v's dtype."""
    g2d = g.reshape(-1, g.shape[-1])  # (tokens, out)
    gU = F.linear(g2d if g2d.dtype is Ut.dtype else g2d.to(Ut.dtype), Ut)  # (tokens, r)
    grad_v = None
    if need_v:
        f32 = PSt.dtype
        grad_core = torch.mm(h2d.T.to(f32), gU.to(f32))  # (r, r)
        grad_v = torch.mv(PSt.T, grad_core.view(-1))  # (u,) = ∂L/∂v from ∂L/∂(Σ M)ᵀ
        if grad_v.dtype is not v_dtype:
            grad_v = grad_v.to(v_dtype)
    return gU, grad_v


def _grad_h(gU: torch.Tensor, core_t: torch.Tensor) -> torch.Tensor:
    """``∂L/∂h = gU (Σ M)`` (tokens, r)."""
    return torch.mm(gU, core_t.T if core_t.dtype is gU.dtype else core_t.T.to(gU.dtype))


class AddLowRankUpdate(torch.autograd.Function):
    """``y ← y + h (Σ M)ᵀ Uᵀ`` in place, differentiable in ``y``, ``h`` and ``v``, for a given ``h = x V``.

    Forward in ``h``'s dtype: float32 (then cast once and added, as a float32 ΔW·x would be) or the output's own
    dtype. Backward, with ``g = ∂L/∂y`` and ``gU = g U`` (tokens, r)::

        ∂L/∂h = gU (Σ M),   ∂L/∂(Σ M)ᵀ = hᵀ gU,   ∂L/∂vᵢ = Σⱼₖ Sⱼ (hᵀ gU)ₖⱼ (Pᵢ)ⱼₖ

    ``y`` is updated in place and marked dirty, so autograd raises if anything had saved it for its backward.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, h: torch.Tensor, v: torch.Tensor, PSt: torch.Tensor, Ut: torch.Tensor,
                by_columns: bool) -> torch.Tensor:
        r = Ut.shape[0]
        core_t = _core_t(v, PSt, r)  # (r, r)
        h2d = h.reshape(-1, r)  # (tokens, r)
        _add_rank_r_(y, h2d, core_t, Ut, by_columns)
        ctx.mark_dirty(y)
        # Only the activation goes through save_for_backward (and saved-tensor hooks such as offloading); the
        # frozen, cached layout tensors and the r x r core are never written in place and are kept as they are.
        ctx.save_for_backward(h2d)
        ctx.consts = (v.dtype, PSt, Ut, core_t, h.shape)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (h2d,), (v_dtype, PSt, Ut, core_t, h_shape) = ctx.saved_tensors, ctx.consts
        gU, grad_v = _grads(g, h2d, v_dtype, PSt, Ut, ctx.needs_input_grad[2])
        grad_h = _grad_h(gU, core_t).view(h_shape) if ctx.needs_input_grad[1] else None  # h's shape
        return g, grad_h, grad_v, None, None, None


class AddProjectedLowRankUpdate(torch.autograd.Function):
    """:class:`AddLowRankUpdate` with the projection ``h = x V`` inside, for a module that shares no input: one
    autograd node instead of two, and ``∂L/∂x = gU (Σ M) Vᵀ`` from the same backward."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, v: torch.Tensor, PSt: torch.Tensor, Ut: torch.Tensor,
                Vt: torch.Tensor, by_columns: bool) -> torch.Tensor:
        r = Ut.shape[0]
        core_t = _core_t(v, PSt, r)  # (r, r)
        x2d = x.reshape(-1, x.shape[-1])  # (tokens, in)
        h2d = F.linear(x2d if x2d.dtype is Vt.dtype else x2d.to(Vt.dtype), Vt)  # (tokens, r)
        _add_rank_r_(y, h2d, core_t, Ut, by_columns)
        ctx.mark_dirty(y)
        ctx.save_for_backward(h2d)
        ctx.consts = (v.dtype, PSt, Ut, Vt, core_t, x.shape, x.dtype)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (h2d,), (v_dtype, PSt, Ut, Vt, core_t, x_shape, x_dtype) = ctx.saved_tensors, ctx.consts
        gU, grad_v = _grads(g, h2d, v_dtype, PSt, Ut, ctx.needs_input_grad[2])
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = torch.mm(_grad_h(gU, core_t), Vt)  # (tokens, in)
            if grad_x.dtype is not x_dtype:
                grad_x = grad_x.to(x_dtype)
            grad_x = grad_x.view(x_shape)
        return g, grad_x, grad_v, None, None, None, None


def add_low_rank_update(y: torch.Tensor, h: torch.Tensor, v: torch.Tensor, layout: FactorLayout) -> torch.Tensor:
    """Functional form of :class:`AddLowRankUpdate` (modifies ``y``)."""
    return AddLowRankUpdate.apply(y, h, v, layout.PSt, layout.Ut, layout.by_columns)


def add_projected_low_rank_update(y: torch.Tensor, x: torch.Tensor, v: torch.Tensor,
                                  layout: FactorLayout) -> torch.Tensor:
    """Functional form of :class:`AddProjectedLowRankUpdate` (modifies ``y``)."""
    return AddProjectedLowRankUpdate.apply(y, x, v, layout.PSt, layout.Ut, layout.Vt, layout.by_columns)


def input_projection(x: torch.Tensor, Vt: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``h = x V`` (tokens, k) from ``Vt = Vᵀ`` (k, in) contiguous, in ``dtype`` (default: float32), through plain
    autograd (one GEMM node whose backward is the rank-k input-gradient update)."""
    dt = dtype or torch.float32
    x2d = x.reshape(-1, x.shape[-1])  # (tokens, in)
    return F.linear(x2d.to(dt), Vt.to(dt))  # (tokens, k)


__all__ = ["AddLowRankUpdate", "AddProjectedLowRankUpdate", "FactorLayout", "SHARED_INPUT_TYPES",
           "add_low_rank_update", "add_projected_low_rank_update", "factor_layouts", "input_projection",
           "shared_input_groups"]
