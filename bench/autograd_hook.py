"""The hook TinyLoRA had before ``tinylora_verl/core/ops.py``: the same ΔW·x through plain autograd (the "before" row).

Installed on an existing adapter (bench only), it runs per adapted module and per forward: ``M = einsum(v, P)``,
``Σ M``, a cast of ``x`` to float32 (or, with ``hook_dtype=activation``, casts of the factors to the
activations' dtype), three ``matmul`` s, a cast back and an out-of-place add. Every one of those is an autograd
node and a pass over an activation-sized tensor. The overhead benchmark times it beside the package's hook in the
same run, and tests/test_bench.py checks that both give the same logits and v-gradients, so this file is also an
independent autograd reference for the hand-written backward.
"""

from __future__ import annotations

import torch

from tinylora_verl.core.factors import mix


def _make_hook(adapter, group: int):
    in_activation_dtype = adapter.config.hook_dtype == "activation"

    def hook(module, args, output):
        if not adapter.enabled:
            return output
        x = args[0]
        SM = module.tinylora_S[:, None] * mix(adapter.vectors[group], module.tinylora_P)  # (r, r)
        if in_activation_dtype and output.dtype != torch.float32:
            dt = output.dtype
            h = (x.reshape(-1, x.shape[-1]) @ module.tinylora_V.to(dt)) @ SM.T.to(dt)  # (tokens, r)
            out2d = output.reshape(-1, output.shape[-1])  # (tokens, out)
            return torch.addmm(out2d, h, module.tinylora_U.T.to(dt)).view(output.shape)
        delta = (x.to(torch.float32) @ module.tinylora_V) @ SM.T @ module.tinylora_U.T  # (..., out)
        return output + delta.to(output.dtype)

    return hook


def install(adapter) -> None:
    """Replace ``adapter`` 's forwards by the base linear plus the plain-autograd hook (``adapter.remove()``
    still takes them off)."""
    forwards = adapter.forwards
    forwards.remove()
    group_of = adapter.routing().group_of
    forwards.hooked = {name: module.register_forward_hook(_make_hook(adapter, group_of[name]))
                       for name, module in adapter.named_adapted_modules()}
