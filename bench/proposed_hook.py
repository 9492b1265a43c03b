"""Prototype of a cheaper TinyLoRA forward hook, installed on an existing adapter (bench only; package untouched).

Measured (fast mode, 1 thread, SmolLM2, 1x256): ``exact`` is NOT faster than the package hook (fp32 1.08x vs
1.06x base, bf16 1.21x vs 1.19x): removing einsum/mul saves ~1-2 ms of ~100 ms overhead, and the tiny ``v @ PS``
is one more ``mm``. ``low_precision`` cuts bf16 from ~1.19x to ~1.08-1.10x. Kept as evidence for the profile.

The hook in ``tinylora_verl/adapter.py`` runs, per adapted module and per forward, ``einsum`` (M = Σ vᵢPᵢ: a
permute/reshape/bmm chain), ``S[:, None] * M``, a cast of ``x`` to float32, three ``matmul`` s, a cast back and
an add. The profile (bench/profiling.py) shows the thin (K or N = r = 2) GEMMs dominate, then the casts and
adds. The rewrite here is mathematically identical:

* ``exact`` (default): Σ folded into the projections at install time, ``PS = (S[:, None] * P).reshape(u, r·r)``,
  so ``ΣM = (v @ PS).view(r, r)`` is one tiny ``mm`` instead of ``einsum`` + ``mul``; the r x r factor stays on
  the token side (``U`` is a constant, so backward needs one tokens x out x r GEMM, not two); in float32 the
  last product is fused with the residual add, ``addmm(output, h, Uᵀ)``. bf16/fp16 keep the package's numerics
  (x cast to float32, ΔW-product in float32, one cast back, one add).
* ``low_precision=True`` (bf16/fp16 models only): the same in the activations' dtype with bf16 copies of U
  and V, ``addmm(output, (x V) (ΣM)ᵀ, Uᵀ)`` — no casts of activations, bf16 GEMMs; ΔW·x picks up ~3 bf16
  roundings instead of 1, which the bench's fidelity section puts in context.
"""

from __future__ import annotations

import torch


def _make_hook(adapter, group: int, low_precision: bool):
    def hook(module, args, output):
        if not adapter.enabled:
            return output
        x = args[0]
        r = module.tinylora_S.shape[0]
        SM = (adapter.vectors[group].to(torch.float32)[None, :] @ module.tinylora_PS).view(r, r)  # (r, r)
        out2d = output.reshape(-1, output.shape[-1])  # (tokens, out)
        if low_precision and output.dtype != torch.float32:
            h = (x.reshape(-1, x.shape[-1]) @ module.tinylora_Vlp) @ SM.T.to(x.dtype)  # (tokens, r)
            return torch.addmm(out2d, h, module.tinylora_Ulp.T).view(output.shape)
        h = (x.reshape(-1, x.shape[-1]).to(torch.float32) @ module.tinylora_V) @ SM.T  # (tokens, r)
        if output.dtype == torch.float32:
            return torch.addmm(out2d, h, module.tinylora_U.T).view(output.shape)
        return output + (h @ module.tinylora_U.T).view(output.shape).to(output.dtype)

    return hook


def install(adapter, low_precision: bool = False) -> None:
    """Replace ``adapter`` 's forward hooks by the prototype (adds non-persistent buffers)."""
    for h in adapter._hooks:
        h.remove()
    hooks = []
    for name, module in adapter._modules_by_name.items():
        S, P = module.tinylora_S, module.tinylora_P  # (r,), (u, r, r)
        PS = (S[None, :, None] * P).reshape(P.shape[0], -1).contiguous()  # (u, r*r)
        module.register_buffer("tinylora_PS", PS, persistent=False)
        if low_precision:
            dt = module.weight.dtype
            module.register_buffer("tinylora_Ulp", module.tinylora_U.to(dt), persistent=False)
            module.register_buffer("tinylora_Vlp", module.tinylora_V.to(dt), persistent=False)
        hooks.append(module.register_forward_hook(_make_hook(adapter, adapter._group_index[name], low_precision)))
    adapter._hooks = hooks
