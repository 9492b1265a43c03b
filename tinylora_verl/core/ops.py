"""The adapter's arithmetic: an adapted linear as one autograd node, with a hand-written backward.

For one adapted linear with input ``x`` (tokens, in) and frozen ``W`` (out, in)::

    h  = x V                          (tokens, r)      shared by modules that read the same x (q/k/v, gate/up)
    y  = x Wᵀ + b + h (Σ M)ᵀ Uᵀ       (tokens, out)    M = Σᵢ vᵢ Pᵢ, ΔW = U Σ M Vᵀ

:class:`TinyLoRALinear` computes the base linear and the update in one node, and in backward adds the update's
input gradient ``gU (Σ M) Vᵀ`` in place into the base's own ``g W``. A forward hook cannot do that: the base
linear's node makes its own input gradient and autograd adds the adapter's (tokens, in) term to it out of place,
one more activation-sized tensor and pass per module (on the CPU also fresh pages). :class:`AddLowRankUpdate` is
that hook's op, kept for linears
whose forward is not ``nn.Linear.forward`` (subclasses, wrappers such as accelerate's), which must run their own.

Why not plain autograd: every op of the update would be its own node and its own pass over a (tokens, out) or
(tokens, in) tensor; the overhead benchmark (bench/overhead.py) is bound by those passes and by per-op dispatch, not
by FLOPs (the GEMMs are rank r = 2). Here the update is one in-place ``addmm_``, ``(Σ M)ᵀ`` is one matrix-vector
product (from a :class:`FactorLayout` the adapter caches per module), and the backward is three thin GEMMs. On the
CPU, where they apply, C++ kernels (:mod:`tinylora_verl.kernels`) do each of these passes in one: the projection
reads x in its own dtype, the add rounds the float32 sum once into y, and the backward reads g once for ``gU``,
``hᵀ gU`` and the in-place add into ``∂L/∂x``; there :func:`tinylora_linear` runs the node as C++
(``kernels/csrc/fused_linear.cpp``, this arithmetic bit for bit, without Python's Function overhead). Layout: the
thin factors enter every GEMM as ``(r, dim)`` row-major (``Vᵀ``, ``Uᵀ``), the transposed operand, which torch's CPU
BLAS runs several times faster than a contiguous (dim, 2) factor.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import kernels

# The torch-ops path casts bf16 activations to float32 for the update (x for x V, the (tokens, out) product before
# it is cast into y, g for g U): a block of rows at a time, so those temporaries stay below 2^24 elements (64 MiB)
# instead of growing with the micro-batch (a 4 x 4608-token micro-batch through an 18944-wide MLP linear: 1.4 GB).
CHUNK_NUMEL = 1 << 24

# Modules that HF decoder layers call on the same input tensor: their x V products can share one GEMM.
SHARED_INPUT_TYPES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def shared_input_groups(names: list[str]) -> list[list[str]]:
    """Groups of ≥ 2 module names under one parent whose types appear together in :data:`SHARED_INPUT_TYPES`.

    Only a candidate: the forward still checks at run time that the modules received the very same tensor.
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
    """A module's frozen factors laid out for the forward, in the dtype the update is computed in.

    ``Ut = Uᵀ`` (r, out) and ``Vt = Vᵀ`` (r, in) contiguous; ``PSt`` (r·r, u) float32 with
    ``PSt @ v = vec((Σ M)ᵀ)``, ``PSt[(k, j), i] = Sⱼ (Pᵢ)ⱼₖ``, so the mixed core is one matrix-vector product.
    ``out_by_columns`` / ``in_by_columns``: add the rank-r update to a row of ``out`` / ``in`` floats as r broadcast
    multiply-adds instead of one GEMM (see :func:`factor_layouts`). ``kernel``: the one-pass CPU kernels
    (:class:`tinylora_verl.kernels.Kernels`) that project and add instead, where they apply; None: torch ops.
    """

    Ut: torch.Tensor
    Vt: torch.Tensor
    PSt: torch.Tensor
    out_by_columns: bool
    in_by_columns: bool
    kernel: Optional[kernels.Kernels] = None


def _by_columns(device: torch.device, dtype: torch.dtype, width: int) -> bool:
    # MKL's float32 GEMM with K = r is ~3x slower on rows of a multiple of 512 floats (76 vs 21 µs at 256 x 1024,
    # 70 vs 27 at 256 x 1536, 161 vs 53 at 256 x 3584; 7 vs 15 at 256 x 576): there r multiply-adds are faster.
    # bf16 GEMMs have no such dip (24 vs 72 µs at 256 x 1536).
    return device.type == "cpu" and dtype == torch.float32 and width % 512 == 0


def factor_layouts(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, P: torch.Tensor,
                   dtype: torch.dtype, kernel: Optional[kernels.Kernels] = None) -> FactorLayout:
    """:class:`FactorLayout` from ``U`` (out, r), ``S`` (r,), ``V`` (in, r), ``P`` (u, r, r); ``kernel`` is kept
    only for float32 factors on the CPU, the only ones it takes."""
    u, r, _ = P.shape
    PSt = (S[None, :, None] * P).transpose(1, 2).reshape(u, r * r).T.contiguous()  # (r·r, u)
    keep = kernel is not None and kernels.takes_factors(U.device, dtype, r)
    return FactorLayout(U.T.to(dtype).contiguous(), V.T.to(dtype).contiguous(), PSt,
                        _by_columns(U.device, dtype, U.shape[0]), _by_columns(V.device, dtype, V.shape[0]),
                        kernel if keep else None)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a call when it already is: a no-op ``.to`` still costs a dispatch, paid per
    linear and step on the hot path."""
    return t if t.dtype is dtype else t.to(dtype)


def _core_t(v: torch.Tensor, PSt: torch.Tensor, r: int) -> torch.Tensor:
    """``(Σ M)ᵀ = (diag(S) Σᵢ vᵢ Pᵢ)ᵀ`` (r, r) in float32 (called inside forward: no graph is recorded).

    Summed in float64 and rounded once: the products are exact there, so the C++ node's loop
    (``csrc/fused_linear.cpp``) gives the same bits whatever order either sums in."""
    return torch.mv(PSt.double(), v.double()).to(PSt.dtype).view(r, r)  # (r, r)


def _row_step(width: int) -> int:
    """Rows per pass of the torch-ops path when it makes a float32 temporary of a (tokens, width) activation."""
    return max(1, CHUNK_NUMEL // max(1, width))


def _add_rank_r_(y2d: torch.Tensor, a: torch.Tensor, core: torch.Tensor, bt: torch.Tensor, by_columns: bool,
                 kernel: Optional[kernels.Kernels] = None) -> None:
    """``y ← y + (a core) bt`` in place, for ``y2d`` (tokens, n), ``a`` (tokens, r), ``core`` (r, r), ``bt`` (r, n).

    With ``kernel`` (and tensors it takes): one pass, the float32 sum rounded once into ``y``. Otherwise torch
    ops: the product is formed in ``bt`` 's dtype; into a ``y`` of another dtype it is cast once and added, a block
    of rows at a time (:data:`CHUNK_NUMEL`). (A mixed-dtype ``add_`` of the float32 product, one rounding fewer,
    measured slower.)
    """
    if kernel is not None and kernels.applies(y2d, a, bt):
        kernel.add_rank_r_(y2d, a, core.contiguous(), bt)
        return
    a2 = torch.mm(a, _as(core, a.dtype))  # (tokens, r)
    if y2d.dtype is not bt.dtype:
        step = _row_step(bt.shape[1])
        for i in range(0, y2d.shape[0], step):
            y2d[i:i + step].add_(torch.mm(a2[i:i + step], bt).to(y2d.dtype))  # (rows, n) float32, cast once
    elif by_columns:
        for j in range(a2.shape[1]):
            y2d.addcmul_(a2[:, j:j + 1], bt[j:j + 1])
    else:
        y2d.addmm_(a2, bt)


def _project(x2d: torch.Tensor, Vt: torch.Tensor, kernel: Optional[kernels.Kernels] = None) -> torch.Tensor:
    """``h = x V`` (tokens, k) in ``Vt`` 's dtype, from ``x2d`` (tokens, in) and ``Vt = Vᵀ`` (k, in); with ``kernel``
    (and an ``x`` it reads) one pass over x in its own dtype, without a float32 copy of a bf16 x."""
    if kernel is not None and kernels.reads(x2d) and Vt.shape[0] <= kernels.MAX_RANK:
        return kernel.project(x2d, Vt)
    if x2d.dtype is Vt.dtype or x2d.numel() <= CHUNK_NUMEL:
        return F.linear(_as(x2d, Vt.dtype), Vt)
    h = torch.empty(x2d.shape[0], Vt.shape[0], dtype=Vt.dtype, device=x2d.device)  # (tokens, k)
    step = _row_step(x2d.shape[1])
    for i in range(0, x2d.shape[0], step):
        torch.mm(x2d[i:i + step].to(Vt.dtype), Vt.T, out=h[i:i + step])  # x cast a block of rows at a time
    return h


def _grad_v(grad_core: torch.Tensor, PSt: torch.Tensor, v_dtype: torch.dtype) -> torch.Tensor:
    """``∂L/∂v = PStᵀ vec(∂L/∂(Σ M)ᵀ)`` (u,): summed in float64 (as :func:`_core_t`), rounded once to float32,
    then to v's dtype."""
    grad = torch.mv(PSt.T.double(), grad_core.double().reshape(-1)).to(PSt.dtype)  # (u,)
    return _as(grad, v_dtype)


def _grads(g2d: torch.Tensor, h2d: torch.Tensor, v_dtype: torch.dtype, PSt: torch.Tensor, Ut: torch.Tensor,
           need_v: bool, kernel: Optional[kernels.Kernels] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``gU = g U`` (tokens, r) and ``∂L/∂v = PStᵀ vec(hᵀ gU)`` (u,), the latter in float32 then v's dtype."""
    gU = _project(g2d, Ut, kernel)  # (tokens, r)
    grad_v = None
    if need_v:
        grad_core = torch.mm(_as(h2d, PSt.dtype).T, _as(gU, PSt.dtype))  # (r, r) = ∂L/∂(Σ M)ᵀ
        grad_v = _grad_v(grad_core, PSt, v_dtype)
    return gU, grad_v


def _autocast_cast(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """What autocast hands a linear: floating tensors other than float64 cast to its dtype."""
    if dtype is None or t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


class TinyLoRALinear(torch.autograd.Function):
    """``y = x Wᵀ + b + h (Σ M)ᵀ Uᵀ`` with ``h = x V`` (or a given ``h``, computed once for modules sharing x).

    The base linear runs as ``F.linear`` would, in ``cast_dtype`` when the caller runs under autocast (the
    caller turns autocast off around this node: the update picks its own dtype). The update is computed in the
    layout's dtype: float32 (then cast once and added, as a float32 ΔW·x would be) or the output's own dtype.
    Backward, with ``g = ∂L/∂y`` and ``gU = g U`` (tokens, r)::

        ∂L/∂x = g W + gU (Σ M) Vᵀ    (the second term added in place into the first)
        ∂L/∂vᵢ = Σⱼₖ Sⱼ (hᵀ gU)ₖⱼ (Pᵢ)ⱼₖ,    ∂L/∂W = gᵀ x,    ∂L/∂b = Σ g    (when they require grad)

    A given ``h`` is taken as a constant (no gradient flows into it): x's gradient through ``h`` is the
    ``gU (Σ M) Vᵀ`` term above, which this node adds itself.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], v: torch.Tensor,
                h: Optional[torch.Tensor], layout: FactorLayout, cast_dtype: Optional[torch.dtype]) -> torch.Tensor:
        xb, wb, bb = (_autocast_cast(t, cast_dtype) for t in (x, weight, bias))
        y = F.linear(xb, wb, bb)  # (..., out)
        r = layout.Ut.shape[0]
        core_t = _core_t(v, layout.PSt, r)  # (r, r)
        if h is None:
            h = _project(x.reshape(-1, x.shape[-1]), layout.Vt, layout.kernel)  # (tokens, r)
        _add_rank_r_(y.view(-1, y.shape[-1]), h, core_t, layout.Ut, layout.out_by_columns, layout.kernel)
        # Only activations (and the weight, as F.linear's own node keeps it) go through save_for_backward, so
        # saved-tensor hooks (offloading, checkpointing) see them; the cached layout and the r x r core are
        # never written in place and are kept as they are.
        ctx.save_for_backward(h, wb, xb if ctx.needs_input_grad[1] else None)
        ctx.consts = (layout, core_t, v.dtype, x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (h, wb, xb), (layout, core_t, v_dtype, x_shape, x_dtype, w_dtype, b_dtype) = ctx.saved_tensors, ctx.consts
        need_x, need_w, need_b, need_v = ctx.needs_input_grad[:4]
        g2d = g.reshape(-1, g.shape[-1])  # (tokens, out)
        grad_x = grad_w = grad_b = grad_v = None
        if need_x:
            grad_x = _as(torch.mm(g2d, wb), x_dtype)  # (tokens, in)
        kernel = layout.kernel
        if (need_x or need_v) and kernel is not None and kernels.reads(g2d) and (
                grad_x is None or kernels.reads(grad_x)):
            # One pass over g (and grad_x): gU stays in registers, no float32 copy of a bf16 g.
            grad_core = kernel.rank_r_backward_(grad_x, g2d, h, layout.Ut, core_t, layout.Vt)  # (r, r)
            grad_v = _grad_v(grad_core, layout.PSt, v_dtype) if need_v else None
        elif need_x or need_v:
            gU, grad_v = _grads(g2d, h, v_dtype, layout.PSt, layout.Ut, need_v)
            if need_x:
                _add_rank_r_(grad_x, gU, core_t.T, layout.Vt, layout.in_by_columns, kernel)
        if need_x:
            grad_x = grad_x.view(x_shape)
        if need_w:
            grad_w = torch.mm(g2d.T, xb.reshape(-1, xb.shape[-1])).to(w_dtype)  # (out, in)
        if need_b:
            grad_b = g2d.sum(0).to(b_dtype)  # (out,)
        return grad_x, grad_w, grad_b, grad_v, None, None, None


class AddLowRankUpdate(torch.autograd.Function):
    """``y ← y + h (Σ M)ᵀ Uᵀ`` in place with ``h = x V``, for a forward hook on a linear that runs its own forward.

    Same arithmetic as :class:`TinyLoRALinear`; here ``∂L/∂x = gU (Σ M) Vᵀ`` is returned as its own tensor for
    autograd to add to the base linear's. ``y`` is marked dirty, so autograd raises if anything had saved it.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, v: torch.Tensor, layout: FactorLayout) -> torch.Tensor:
        r = layout.Ut.shape[0]
        core_t = _core_t(v, layout.PSt, r)  # (r, r)
        h = _project(x.reshape(-1, x.shape[-1]), layout.Vt, layout.kernel)  # (tokens, r)
        _add_rank_r_(y.view(-1, y.shape[-1]), h, core_t, layout.Ut, layout.out_by_columns, layout.kernel)
        ctx.mark_dirty(y)
        ctx.save_for_backward(h)
        ctx.consts = (layout, core_t, v.dtype, x.shape, x.dtype)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (h,), (layout, core_t, v_dtype, x_shape, x_dtype) = ctx.saved_tensors, ctx.consts
        gU, grad_v = _grads(g.reshape(-1, g.shape[-1]), h, v_dtype, layout.PSt, layout.Ut, ctx.needs_input_grad[2],
                            layout.kernel)
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_h = torch.mm(gU, _as(core_t.T, gU.dtype))  # (tokens, r)
            grad_x = torch.empty(grad_h.shape[0], layout.Vt.shape[1], dtype=x_dtype, device=gU.device)  # (tokens, in)
            step = _row_step(grad_x.shape[1])
            for i in range(0, grad_x.shape[0], step):
                grad_x[i:i + step].copy_(torch.mm(grad_h[i:i + step], layout.Vt))  # float32 rows, cast once
            grad_x = grad_x.view(x_shape)  # (..., in)
        return g, grad_x, grad_v, None


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``x`` 's device, or None."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def tinylora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], v: torch.Tensor,
                    layout: FactorLayout, h: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Functional form of :class:`TinyLoRALinear`: ``F.linear(x, W + ΔW, b)``, under autocast too.

    With the layout's CPU kernels the node is their C++ ``linear`` (the same arithmetic, forward and backward
    without Python's per-call overhead); otherwise :class:`TinyLoRALinear`.
    """
    kernel = layout.kernel

    def node(cast_dtype: Optional[torch.dtype]) -> torch.Tensor:
        if kernel is not None:
            return kernel.linear(x, weight, bias, v, h, layout.Ut, layout.Vt, layout.PSt, cast_dtype)
        return TinyLoRALinear.apply(x, weight, bias, v, h, layout, cast_dtype)

    adt = autocast_dtype(x)
    if adt is None:
        return node(None)
    with torch.autocast(x.device.type, enabled=False):
        return node(adt)


def add_low_rank_update(y: torch.Tensor, x: torch.Tensor, v: torch.Tensor, layout: FactorLayout) -> torch.Tensor:
    """Functional form of :class:`AddLowRankUpdate` (modifies ``y``), with autocast off around it."""
    if autocast_dtype(x) is None:
        return AddLowRankUpdate.apply(y, x, v, layout)
    with torch.autocast(x.device.type, enabled=False):
        return AddLowRankUpdate.apply(y, x, v, layout)


def shared_projection(x: torch.Tensor, Vt: torch.Tensor, kernel: Optional[kernels.Kernels] = None) -> torch.Tensor:
    """``h = x [V₁ … V_k]`` (tokens, k·r) in ``Vt`` 's dtype from the stacked ``Vt`` (k·r, in), outside autograd
    (each module's :class:`TinyLoRALinear` adds its own share of x's gradient) and outside autocast."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        return _project(x.reshape(-1, x.shape[-1]), Vt, kernel)


__all__ = ["AddLowRankUpdate", "FactorLayout", "SHARED_INPUT_TYPES", "TinyLoRALinear", "add_low_rank_update",
           "autocast_dtype", "factor_layouts", "shared_projection", "shared_input_groups", "tinylora_linear"]
