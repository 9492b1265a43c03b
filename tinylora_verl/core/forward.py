"""How each adapted module runs: the fused TinyLoRA linear, or a forward hook where the module has its own forward.

A module whose forward is ``nn.Linear.forward`` gets an instance ``forward`` that runs
:class:`~tinylora_verl.core.ops.TinyLoRALinear` (base linear and update in one node, the update's input gradient
added in place). Any other linear (a subclass with its own forward, or one already wrapped, as accelerate's offload
hooks do) keeps its forward, and a forward hook adds the update (:class:`~tinylora_verl.core.ops.AddLowRankUpdate`).
Either way ``state_dict()`` and the module tree are the base model's.

Modules that read one input (q/k/v, gate/up) share one ``x [V₁ … V_k]`` GEMM, computed by the first of them to run.
On the CPU kernels they go further and run as one C++ node (:class:`tinylora_verl.kernels.GroupNodes`). The layouts
of the frozen factors are cached per module and dtype. Everything the forwards read of their adapter comes in a
:class:`Routing`.
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .ops import FactorLayout, add_low_rank_update, factor_layouts, shared_input_groups, shared_projection, \
    tinylora_linear


@dataclass(frozen=True)
class Routing:
    """What an adapter's forwards read of it.

    ``vectors`` is the live table of v by group key (``str(group)``): read per call rather than cached, because
    FSDP swaps parameter tensors. ``enabled()`` says whether ΔW applies (False inside ``disable_adapter``).
    """

    modules: Mapping[str, nn.Module]
    group_of: Mapping[str, int]
    vectors: Mapping[str, nn.Parameter]
    enabled: Callable[[], bool]
    activation: bool
    cpu_kernel: str


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
    """The forwards (or hooks) of one adapter's modules (:class:`Routing`), with their caches.

    ``fused=False`` puts every module on the hook path (the benchmark's "hook" row; linears with their own
    forward are always there); ``share_inputs=False`` gives every fused module its own ``x V`` GEMM;
    ``group_nodes=False`` keeps siblings that share x as one node each (with one shared ``x V`` GEMM).
    """

    def __init__(self, routing: Routing, fused: bool = True, share_inputs: bool = True, group_nodes: bool = True):
        self.routing = routing
        groups = shared_input_groups(list(routing.modules)) if share_inputs else []
        self.siblings = {n: (tuple(g), i) for g in groups for i, n in enumerate(g)}
        self.use_group_nodes = group_nodes
        self.group_nodes = kernels.GroupNodes()
        self.layouts: dict[tuple[str, torch.dtype], tuple] = {}
        self.stacked_vt: dict[tuple[str, torch.dtype], tuple] = {}
        self.shared_inputs: dict[str, tuple] = {}
        # name -> (module, the bound forward installed on it) / the hook's handle
        self.replaced: dict[str, tuple[nn.Module, types.MethodType]] = {}
        self.hooked: dict[str, torch.utils.hooks.RemovableHandle] = {}
        for name, module in routing.modules.items():
            if fused and runs_plain_linear_forward(module):
                # A bound method, not a closure over the module: deepcopy rebinds it to the copy.
                module.forward = types.MethodType(self._fused_forward(name), module)
                self.replaced[name] = (module, module.forward)
            else:
                self.hooked[name] = module.register_forward_hook(self._hook(name))

    def _fused_forward(self, name: str):
        routing, vectors = self.routing, self.routing.vectors
        group_key = str(routing.group_of[name])
        siblings, position = self.siblings.get(name, ((name,), 0))

        def forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            """``F.linear(x, W + ΔW, b)`` with ``ΔW = U Σ M Vᵀ``, ``M = Σᵢ vᵢ Pᵢ``."""
            if not routing.enabled() or name not in self.replaced:
                return F.linear(x, module.weight, module.bias)
            dt = _update_dtype(routing.activation, _output_dtype(x))
            layout = self.layout(name, module, dt)
            if len(siblings) > 1 and self.use_group_nodes and layout.kernel is not None:
                y = self.group_nodes.output(siblings, position, x, dt, lambda: self._group_inputs(siblings, dt))
                if y is not None:
                    return y
            h = None
            if len(siblings) > 1:
                r = layout.Ut.shape[0]
                h = self.shared_projection(siblings, x, dt)[:, position * r:(position + 1) * r]  # (tokens, r)
            return tinylora_linear(x, module.weight, module.bias, vectors[group_key], layout, h)

        return forward

    def _hook(self, name: str):
        routing, vectors = self.routing, self.routing.vectors
        group_key = str(routing.group_of[name])

        def hook(module: nn.Module, args, output):
            """``output + x V (Σ M)ᵀ Uᵀ``, i.e. ``x (W + ΔW)ᵀ`` with ``ΔW = U Σ M Vᵀ``, ``M = Σᵢ vᵢ Pᵢ``."""
            if not routing.enabled():
                return output
            layout = self.layout(name, module, _update_dtype(routing.activation, output.dtype))
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
            takes = kernels.takes_factors(U.device, dt, U.shape[1])
            kernel = kernels.load(self.routing.cpu_kernel) if takes else None
            hit = (factor_layouts(U, S, V, P, dtype=dt, kernel=kernel), (U, S, V, P), versions)
            self.layouts[(name, dt)] = hit
        return hit[0]

    def stacked(self, siblings: tuple[str, ...], dt: torch.dtype) -> tuple[tuple[FactorLayout, ...], torch.Tensor]:
        """The siblings' current layouts and their ``Vᵀ`` stacked (k·r, in), restacked when a layout is rebuilt."""
        modules = self.routing.modules
        layouts = tuple(self.layout(n, modules[n], dt) for n in siblings)
        key = (siblings[0], dt)
        stacked = self.stacked_vt.get(key)
        if stacked is None or any(a is not b for a, b in zip(stacked[0], layouts)):
            stacked = (layouts, torch.cat([lay.Vt for lay in layouts], dim=0))  # (k·r, in)
            self.stacked_vt[key] = stacked
        return stacked

    def _group_inputs(self, siblings: tuple[str, ...], dt: torch.dtype) -> kernels.GroupInputs:
        """What the group node of ``siblings`` reads (computed only when a group's outputs are not already held)."""
        layouts, vt = self.stacked(siblings, dt)
        modules = [self.routing.modules[n] for n in siblings]
        vectors = [self.routing.vectors[str(self.routing.group_of[n])] for n in siblings]
        return kernels.GroupInputs(layouts, vt, modules, vectors, all(n in self.replaced for n in siblings))

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
        self.group_nodes.clear()


__all__ = ["AdapterForwards", "runs_plain_linear_forward"]
