"""Modules that read one input (q/k/v, gate/up) as one C++ autograd node on the CPU kernels.

The first sibling to run on ``x`` computes every sibling's output in one node (the kernels' ``group_linear``: one
projection ``x [V₁ … V_k]``, and in backward one pass adding the k updates into ``∂L/∂x``); each other sibling that
runs on the very same tensor, unmodified (its version counter), in the same grad mode, next, takes its own.
Anything else (a sibling called twice, another input, ``x`` written in place in between) ends the grouping for
that group: from then on its modules run one node each, with correct results. CPU tensors only; the core's
forwards ask for it only where a layout holds the kernels.
"""

from __future__ import annotations

import weakref
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

# What a weight read from a sibling's module must be: a plain tensor, not a sharded subclass.
_PLAIN = (torch.Tensor, nn.Parameter)


class GroupInputs(NamedTuple):
    """What the group node reads: the siblings' factor layouts (the core's ``FactorLayout``: ``Ut`` (r, out),
    ``Vt`` (r, in), ``PSt``, ``kernel``), their stacked ``Vᵀ`` (k·r, in), modules, vectors, and whether every
    sibling runs the fused forward (not a hook)."""

    layouts: Sequence
    vt: torch.Tensor
    modules: Sequence[nn.Module]
    vectors: Sequence[torch.Tensor]
    all_fused: bool


def _eligible(g: GroupInputs) -> bool:
    """Whether the group can be one node: kernels for every layout, every sibling fused, one rank, biases on all
    siblings or none, every weight a plain (out, in) tensor."""
    biases = [m.bias for m in g.modules]
    return (g.all_fused and all(lay.kernel is not None for lay in g.layouts)
            and len({lay.Ut.shape[0] for lay in g.layouts}) == 1
            and not 0 < sum(b is not None for b in biases) < len(biases)
            and all(type(m.weight) in _PLAIN and m.weight.shape == (lay.Ut.shape[1], lay.Vt.shape[1])
                    for m, lay in zip(g.modules, g.layouts)))


def group_linear(x: torch.Tensor, g: GroupInputs) -> list[torch.Tensor]:
    """``[F.linear(x, W_m + ΔW_m, b_m) for each m]`` as the kernels' one C++ node, under autocast too (then the
    node casts the base linear itself and computes the update in float32)."""
    kernel = g.layouts[0].kernel
    biases = [m.bias for m in g.modules]
    args = ([m.weight for m in g.modules], biases if biases[0] is not None else [], list(g.vectors),
            [lay.Ut for lay in g.layouts], g.vt, [lay.PSt for lay in g.layouts])
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return kernel.group_linear(x, *args, None)
    with torch.autocast(dev, enabled=False):
        return kernel.group_linear(x, *args, torch.get_autocast_dtype(dev))


class GroupNodes:
    """The group outputs computed ahead and not yet taken, and the groups that fell back to a node per module."""

    def __init__(self):
        # first sibling's name -> (weak x, its version, grad mode, dtype, the outputs not yet taken (None once taken))
        self.outputs: dict[str, tuple] = {}
        # Groups seen not to feed all siblings one tensor in turn: they run module by module from then on.
        self.ungrouped: set[str] = set()

    def output(self, siblings: tuple[str, ...], position: int, x: torch.Tensor, dt: torch.dtype,
               inputs: Callable[[], GroupInputs]) -> Optional[torch.Tensor]:
        """Sibling ``position`` 's output from the group's node, or None: the group cannot be one node, or the
        model does not feed every sibling this ``x`` in turn (the group then runs module by module from this call
        on). ``inputs()`` is called only when the group's outputs are computed. Untaken outputs are held until the
        group's next call."""
        key = siblings[0]
        if key in self.ungrouped:
            return None
        entry = self.outputs.pop(key, None)
        if entry is not None:
            ref, version, grad, edt, outputs = entry
            y = outputs[position]
            if (y is None or ref() is not x or x._version != version or grad != torch.is_grad_enabled()
                    or edt != dt):
                self.ungrouped.add(key)
                return None
            outputs[position] = None
            if any(o is not None for o in outputs):
                self.outputs[key] = entry
            return y
        g = inputs()
        if not _eligible(g):
            return None
        outputs = group_linear(x, g)
        y, outputs[position] = outputs[position], None
        self.outputs[key] = (weakref.ref(x), x._version, torch.is_grad_enabled(), dt, outputs)
        return y

    def clear(self) -> None:
        self.outputs.clear()
        self.ungrouped.clear()


__all__ = ["GroupInputs", "GroupNodes", "group_linear"]
