"""Prototype of a cheaper TinyLoRA forward hook, installed on an existing adapter (bench only; the package is untouched).

The hook in ``tinylora_verl/adapter.py`` runs, per adapted module and per forward, ``einsum`` (M = Σ vᵢPᵢ),
``S[:, None] * M``, a cast of ``x`` to float32, three ``matmul`` s, a cast back and an add — about ten
dispatcher ops plus their autograd nodes, for a rank-2 correction. The mathematically identical rewrite here:

* folds Σ into the projections once at install time: ``PS = (S[:, None] * P).reshape(u, r·r)`` (buffer), so
  ``ΣM = (v @ PS).view(r, r)`` is one ``mm`` (``einsum`` costs several ops: permutes, reshapes, a ``bmm``);
* moves the r x r factor onto the small side: ``B = U @ (ΣM)`` (out x r) instead of a (tokens x r) @ (r x r)
  product on the token side followed by a separate (tokens x r) @ (r x out);
* in float32 fuses the last product with the residual add: ``addmm(output, x V, Bᵀ)``. In bf16/fp16 it keeps
  the package's numerics exactly (``x`` cast to float32, ΔW-product in float32, one cast back, one add).

Per module this is 4 ops in float32 (mm, matmul, mm, addmm) and 6 in bf16, against ~10 + einsum internals.
"""

from __future__ import annotations

import torch


def _make_hook(adapter, group: int):
    def hook(module, args, output):
        if not adapter.enabled:
            return output
        x = args[0]
        v = adapter.vectors[group]
        r = module.tinylora_S.shape[0]
        SM = (v.to(torch.float32)[None, :] @ module.tinylora_PS).view(r, r)  # (r, r) = diag(S) M
        B = module.tinylora_U @ SM  # (out, r)
        h = x.to(torch.float32) @ module.tinylora_V  # (..., r)
        if output.dtype == torch.float32:
            out2d = torch.addmm(output.reshape(-1, output.shape[-1]), h.reshape(-1, r), B.T)  # (tokens, out)
            return out2d.view(output.shape)
        return output + (h @ B.T).to(output.dtype)

    return hook


def install(adapter) -> None:
    """Replace ``adapter`` 's forward hooks by the prototype (adds a non-persistent ``tinylora_PS`` buffer)."""
    for h in adapter._hooks:
        h.remove()
    hooks = []
    for name, module in adapter._modules_by_name.items():
        S, P = module.tinylora_S, module.tinylora_P  # (r,), (u, r, r)
        PS = (S[None, :, None] * P).reshape(P.shape[0], -1).contiguous()  # (u, r*r)
        module.register_buffer("tinylora_PS", PS, persistent=False)
        hooks.append(module.register_forward_hook(_make_hook(adapter, adapter._group_index[name])))
    adapter._hooks = hooks
