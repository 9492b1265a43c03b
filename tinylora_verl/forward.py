"""How each adapted module runs: the fused TinyLoRA linear, or a forward hook where the module has its own forward.

A module whose forward is ``nn.Linear.forward`` gets an instance ``forward`` that runs
:class:`~tinylora_verl.ops.TinyLoRALinear` (base linear and update in one node, the update's input gradient added
in place). Any other linear (a subclass with its own forward, or one already wrapped, as accelerate's offload
hooks do) keeps its forward, and a forward hook adds the update (:class:`~tinylora_verl.ops.AddLowRankUpdate`).
Either way ``state_dict()`` and the module tree are the base model's.

Modules that read one input (q/k/v, gate/up) run as one node when they receive the very same tensor: the first of
them to run computes every sibling's output in one C++ node (:func:`~tinylora_verl.ops.tinylora_group_linear`, on
the CPU kernels) and the others take theirs. Without the kernels they share one ``x [V₁ … V_k]`` GEMM, computed by
the first to run. The layouts of the frozen factors are cached per module and dtype.
"""

from __future__ import annotations

import types
import weakref
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernel
from .ops import FactorLayout, add_low_rank_update, factor_layouts, shared_input_groups, shared_projection, \
    tinylora_group_linear, tinylora_linear

if TYPE_CHECKING:
    from .adapter import TinyLoRAAdapter


# What a weight read from a sibling's module must be for the group node: a plain tensor, not a sharded subclass.
_PLAIN = (torch.Tensor, nn.Parameter)


def runs_plain_linear_forward(module: nn.Module) -> bool:
    """True when calling ``module`` runs ``nn.Linear.forward`` (so the fused op may replace it)."""
    return "forward" not in module.__dict__ and type(module).forward is nn.Linear.forward


def _update_dtype(activation: bool, out_dtype: torch.dtype) -> torch.dtype:
    # float32 by default; bf16/fp16 thin GEMMs (float32 accumulation inside) with hook_dtype=activation.
    return out_dtype if activation and out_dtype != torch.float32 else torch.float32


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(x, W)`` returns: autocast's for an eligible input, else x's own."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return x.dtype


class AdapterForwards:
    """The forwards (or hooks) of one adapter's modules, with their caches.

    ``fused=False`` puts every module on the hook path (the benchmark's "hook" row; linears with their own
    forward are always there); ``share_inputs=False`` gives every fused module its own ``x V`` GEMM;
    ``group_nodes=False`` keeps siblings that share x as one node each (with one shared ``x V`` GEMM).
    """

    def __init__(self, adapter: "TinyLoRAAdapter", fused: bool = True, share_inputs: bool = True,
                 group_nodes: bool = True):
        self.adapter = adapter
        groups = shared_input_groups(adapter.module_names) if share_inputs else []
        self.siblings = {n: (tuple(g), i) for g in groups for i, n in enumerate(g)}
        self.group_nodes = group_nodes
        self.layouts: dict[tuple[str, torch.dtype], tuple] = {}
        self.stacked_vt: dict[tuple[str, torch.dtype], tuple] = {}
        self.shared_inputs: dict[str, tuple] = {}
        # first sibling's name -> (weak x, its version, grad mode, dtype, the outputs not yet taken (None once taken))
        self.group_outputs: dict[str, tuple] = {}
        # Groups seen not to feed all siblings one tensor in turn: they run module by module from then on.
        self.ungrouped: set[str] = set()
        # name -> (module, the bound forward installed on it) / the hook's handle
        self.replaced: dict[str, tuple[nn.Module, types.MethodType]] = {}
        self.hooked: dict[str, torch.utils.hooks.RemovableHandle] = {}
        for name, module in adapter.named_adapted_modules():
            if fused and runs_plain_linear_forward(module):
                # A bound method, not a closure over the module: deepcopy rebinds it to the copy.
                module.forward = types.MethodType(self._fused_forward(name), module)
                self.replaced[name] = (module, module.forward)
            else:
                self.hooked[name] = module.register_forward_hook(self._hook(name))

    def _fused_forward(self, name: str):
        adapter, vectors = self.adapter, self.adapter.vectors._parameters
        group_key, activation = str(adapter._group_index[name]), adapter.config.hook_dtype == "activation"
        siblings, position = self.siblings.get(name, ((name,), 0))

        def forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            """``F.linear(x, W + ΔW, b)`` with ``ΔW = U Σ M Vᵀ``, ``M = Σᵢ vᵢ Pᵢ``."""
            if not adapter.enabled or name not in self.replaced:
                return F.linear(x, module.weight, module.bias)
            dt = _update_dtype(activation, _output_dtype(x))
            layout = self.layout(name, module, dt)
            if len(siblings) > 1 and self.group_nodes and layout.kernel is not None:
                y = self.group_output(siblings, position, x, dt)
                if y is not None:
                    return y
            h = None
            if len(siblings) > 1:
                r = layout.Ut.shape[0]
                h = self.shared_projection(siblings, x, dt)[:, position * r:(position + 1) * r]  # (tokens, r)
            # Read the vector from the list's dict each call (not a cached object): FSDP swaps parameter tensors.
            return tinylora_linear(x, module.weight, module.bias, vectors[group_key], layout, h)

        return forward

    def _hook(self, name: str):
        adapter, vectors = self.adapter, self.adapter.vectors._parameters
        group_key, activation = str(adapter._group_index[name]), adapter.config.hook_dtype == "activation"

        def hook(module: nn.Module, args, output):
            """``output + x V (Σ M)ᵀ Uᵀ``, i.e. ``x (W + ΔW)ᵀ`` with ``ΔW = U Σ M Vᵀ``, ``M = Σᵢ vᵢ Pᵢ``."""
            if not adapter.enabled:
                return output
            layout = self.layout(name, module, _update_dtype(activation, output.dtype))
            return add_low_rank_update(output, args[0], vectors[group_key], layout)

        return hook

    def layout(self, name: str, module: nn.Module, dt: torch.dtype) -> FactorLayout:
        """``module`` 's factors laid out in ``dt``, rebuilt whenever a factor buffer is replaced (``model.to``)
        or written in place (a broadcast from rank 0), as their identity and version say."""
        b = module._buffers
        U, S, V, P = b["tinylora_U"], b["tinylora_S"], b["tinylora_V"], b["tinylora_P"]
        versions = (U._version, S._version, V._version, P._version)
        hit = self.layouts.get((name, dt))
        if (hit is None or hit[2] != versions or hit[1][0] is not U or hit[1][1] is not S or hit[1][2] is not V
                or hit[1][3] is not P):
            # Only layouts that can use it build it: a bf16 layout (hook_dtype=activation) or a GPU one never does.
            takes = cpu_kernel.takes_factors(U.device, dt, U.shape[1])
            kernel = cpu_kernel.load(self.adapter.config.cpu_kernel) if takes else None
            hit = (factor_layouts(U, S, V, P, dtype=dt, kernel=kernel), (U, S, V, P), versions)
            self.layouts[(name, dt)] = hit
        return hit[0]

    def stacked(self, siblings: tuple[str, ...], dt: torch.dtype) -> tuple[tuple[FactorLayout, ...], torch.Tensor]:
        """The siblings' current layouts and their ``Vᵀ`` stacked (k·r, in), restacked when a layout is rebuilt."""
        modules = self.adapter._modules_by_name
        layouts = tuple(self.layout(n, modules[n], dt) for n in siblings)
        key = (siblings[0], dt)
        stacked = self.stacked_vt.get(key)
        if stacked is None or any(a is not b for a, b in zip(stacked[0], layouts)):
            stacked = (layouts, torch.cat([lay.Vt for lay in layouts], dim=0))  # (k·r, in)
            self.stacked_vt[key] = stacked
        return stacked

    def group_output(self, siblings: tuple[str, ...], position: int, x: torch.Tensor,
                     dt: torch.dtype) -> Optional[torch.Tensor]:
        """Sibling ``position`` 's output from one node for the whole group: computed by the first sibling to run
        on ``x``, handed to each other sibling that runs on the very same tensor, unmodified (its version counter),
        in the same grad mode, next.

        None when the group cannot be one node (no CPU kernels for these layouts, a sibling on the hook path,
        biases on some siblings only, a sibling's weight not a plain (out, in) tensor, as under per-module
        sharding) or when the model does not feed every sibling this x in turn: then the group, from that call on,
        runs module by module. Untaken outputs are held until the group's next call.
        """
        key = siblings[0]
        if key in self.ungrouped:
            return None
        entry = self.group_outputs.pop(key, None)
        if entry is not None:
            ref, version, grad, edt, outputs = entry
            y = outputs[position]
            if (y is None or ref() is not x or x._version != version or grad != torch.is_grad_enabled()
                    or edt != dt):
                self.ungrouped.add(key)
                return None
            outputs[position] = None
            if any(o is not None for o in outputs):
                self.group_outputs[key] = entry
            return y
        layouts, vt = self.stacked(siblings, dt)
        modules = [self.adapter._modules_by_name[n] for n in siblings]
        biases = [m.bias for m in modules]
        if (any(lay.kernel is None for lay in layouts) or any(n not in self.replaced for n in siblings)
                or len({lay.Ut.shape[0] for lay in layouts}) > 1 or 0 < sum(b is not None for b in biases) < len(biases)
                or any(type(m.weight) not in _PLAIN or m.weight.shape != (lay.Ut.shape[1], lay.Vt.shape[1])
                       for m, lay in zip(modules, layouts))):
            return None
        vectors, index = self.adapter.vectors._parameters, self.adapter._group_index
        outputs = tinylora_group_linear(x, [m.weight for m in modules], biases if biases[0] is not None else [],
                                        [vectors[str(index[n])] for n in siblings], layouts, vt)
        y, outputs[position] = outputs[position], None
        self.group_outputs[key] = (weakref.ref(x), x._version, torch.is_grad_enabled(), dt, outputs)
        return y

    def shared_projection(self, siblings: tuple[str, ...], x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """``x [V₁ … V_k]`` (tokens, k·r) for modules that read the same ``x``, computed by the first of them to
        run and reused by the others. Identity of the input tensor and its version (not written in place since),
        not names, decide reuse. The entry is dropped once every sibling has its slice and holds x only weakly; an
        entry left by siblings fed different inputs keeps just its (tokens, k·r) projection until the next shared
        input replaces it."""
        key = siblings[0]
        cached = self.shared_inputs.get(key)
        if cached is None or cached[0]() is not x or cached[3] != x._version or cached[1].dtype != dt:
            layouts, vt = self.stacked(siblings, dt)
            cached = (weakref.ref(x), shared_projection(x, vt, layouts[0].kernel), [len(siblings)], x._version)
            self.shared_inputs[key] = cached
        cached[2][0] -= 1
        if cached[2][0] == 0:
            del self.shared_inputs[key]
        return cached[1]

    def mode_of(self, name: str) -> Optional[str]:
        """``"fused"``, ``"hook"``, or None (not adapted, or removed)."""
        return "fused" if name in self.replaced else "hook" if name in self.hooked else None

    def remove(self) -> None:
        """Hooks off and forwards back to the class's. A forward that something wrapped since stays in place and
        runs the plain linear from then on."""
        for handle in self.hooked.values():
            handle.remove()
        self.hooked = {}
        for module, installed in self.replaced.values():
            if module.__dict__.get("forward") is installed:
                del module.forward
        self.replaced = {}
        self.layouts.clear()
        self.stacked_vt.clear()
        self.shared_inputs.clear()
        self.group_outputs.clear()
        self.ungrouped.clear()


__all__ = ["AdapterForwards", "runs_plain_linear_forward"]
