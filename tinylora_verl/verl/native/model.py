"""TinyLoRA inside a loaded vLLM model: fixed buffers on every fused linear, and the receiver of the native stream.

:func:`attach` runs right after vLLM builds and loads the model, before its first forward, so the update is traced
into whatever vLLM compiles (torch.compile, CUDA graphs): each ``QKVParallelLinear``, ``MergedColumnParallelLinear``,
``ColumnParallelLinear``, ``RowParallelLinear`` and ``ReplicatedLinear`` gets four float32 buffers at their final
shape (zeros: no update) and its ``quant_method.apply`` is wrapped to add :func:`tinylora_verl.core.native.add_update`
to the local shard's output, before the layer's all-gather or all-reduce. Syncs only ``copy_`` into the buffers.

vLLM internals used, and why (also in :mod:`tinylora_verl.verl.compat`): the five layer classes and their sharding
attributes (``tp_rank``, ``tp_size``, ``output_sizes``, ``input_size``, ``input_size_per_partition``,
``output_size_per_partition``, ``num_heads``/``num_kv_heads``/``head_size``/``total_num_kv_heads``), their
``quant_method.apply(layer, x, bias)`` (the local GEMM, identical in vLLM 0.24 and 0.31), and the model's
``packed_modules_mapping`` (``qkv_proj`` ← q/k/v_proj, ``gate_up_proj`` ← gate/up_proj).

:class:`NativeModel` receives the stream. Install tensors (``tinylora_native/<module>/<U|S|V|P|G>``) and ``v`` are
collected until the checksum, which comes last; then the install (if any) is applied and the cores are recomputed
from ``v``. It refuses a ``v`` before any install, a non-finite ``v``, a checksum that does not match, and install
names that match no layer.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
from torch import nn

from ...core import native

logger = logging.getLogger(__name__)

ATTR = "_tinylora_native"
BUFFERS = ("vt", "core_t", "a", "ut")


def layer_layout(layer: nn.Module) -> Optional[native.LayerLayout]:
    """The rank-local layout of a vLLM linear, or None for a layer this does not adapt."""
    kind = type(layer).__name__
    rank, size = int(getattr(layer, "tp_rank", 0)), int(getattr(layer, "tp_size", 1))
    if kind == "QKVParallelLinear":
        return native.qkv_layout(layer.input_size, layer.head_size, layer.total_num_heads, layer.total_num_kv_heads,
                                 rank, size, getattr(layer, "v_head_size", None))
    if kind == "MergedColumnParallelLinear":
        return native.column_layout(layer.input_size, list(layer.output_sizes), rank, size)
    if kind == "ColumnParallelLinear":
        return native.column_layout(layer.input_size, [layer.output_size_per_partition * size], rank, size)
    if kind == "RowParallelLinear":
        return native.row_layout(layer.input_size_per_partition * size, layer.output_size_per_partition, rank, size)
    if kind == "ReplicatedLinear":
        return native.column_layout(layer.input_size, [layer.output_size], 0, 1)
    return None


def _wrap_apply(layer: nn.Module) -> None:
    """Make ``layer.quant_method.apply`` add the update (an instance attribute: vLLM gives every layer its own
    quant method object, which is checked)."""
    method = layer.quant_method
    inner = method.apply

    def apply(module, x, bias=None):
        out = inner(module, x, bias)
        return native.add_update(out, x, module.tinylora_a, module.tinylora_ut)

    method.apply = apply


class NativeModel:
    """The TinyLoRA state of one vLLM worker's model (attached as ``model._tinylora_native``)."""

    def __init__(self, model: nn.Module, rank: int):
        self.model, self.rank = model, rank
        self.layers: dict[str, tuple[nn.Module, native.LayerLayout]] = {}
        methods = set()
        for name, layer in model.named_modules():
            layout = layer_layout(layer) if hasattr(layer, "quant_method") else None
            if layout is None:
                continue
            if id(layer.quant_method) in methods:
                raise RuntimeError(f"vLLM layer {name} shares its quant_method with another layer; TinyLoRA's native "
                                   "mode wraps it per layer")
            methods.add(id(layer.quant_method))
            device = next((t.device for t in layer.parameters()), None)
            for key, buf in native.empty_buffers(layout, rank, device).items():
                layer.register_buffer(f"tinylora_{key}", buf, persistent=False)
            _wrap_apply(layer)
            self.layers[name] = (layer, layout)
        if not self.layers:
            raise RuntimeError(f"TinyLoRA native mode found no vLLM linear layer in {type(model).__name__}")
        packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
        self.fused_of = {leaf: (fused, j) for fused, leaves in packed.items() for j, leaf in enumerate(leaves)}
        self.installed: dict[str, tuple[str, int, torch.Tensor, torch.Tensor, int]] = {}
        self.pending: dict[str, torch.Tensor] = {}
        self.v: Optional[torch.Tensor] = None
        self.checksum: Optional[int] = None
        self.install_bytes = 0
        self.syncs = 0

    # ------------------------------------------------------------------ names
    def locate(self, module: str) -> tuple[str, int]:
        """``(vLLM layer name, slice index)`` of a trainer module, e.g. ``...self_attn.k_proj`` → ``qkv_proj``, 1."""
        parent, _, leaf = module.rpartition(".")
        fused, j = self.fused_of.get(leaf, (leaf, 0))
        name = f"{parent}.{fused}" if parent else fused
        if name not in self.layers:
            raise ValueError(f"TinyLoRA native install names {module!r}, which maps to no adapted vLLM layer "
                             f"({name!r}); vLLM layers include {list(self.layers)[:3]}")
        return name, j

    # ------------------------------------------------------------------ receiving
    def accept(self, weights: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """Keep this stream's native tensors (cloned: senders reuse their buckets); return the others. The
        checksum, last in every native stream, commits what was received."""
        rest = []
        for name, tensor in weights:
            if not name.startswith(native.PREFIX):
                rest.append((name, tensor))
                continue
            self.pending[name] = tensor.detach().clone()
            if name == native.CHECK_NAME:
                self.commit()
        return rest

    def commit(self) -> None:
        pending, self.pending = self.pending, {}
        factors = {n: t for n, t in pending.items() if n not in (native.V_NAME, native.CHECK_NAME)}
        if factors:
            self._install(factors)
        if native.V_NAME not in pending:
            raise RuntimeError("TinyLoRA native sync carried no v: the trainer's stream was cut short")
        self._set_v(pending[native.V_NAME], int(pending[native.CHECK_NAME].reshape(-1)[0]))

    def _install(self, tensors: dict[str, torch.Tensor]) -> None:
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            module, part = native.parse_factor_name(name)
            by_module.setdefault(module, {})[part] = t
        for module, parts in by_module.items():
            missing = [p for p in native.FACTOR_PARTS if p not in parts]
            if missing:
                raise RuntimeError(f"TinyLoRA native install of {module} lacks {missing}")
            layer_name, j = self.locate(module)
            layer, layout = self.layers[layer_name]
            device = layer.tinylora_vt.device
            U, V = parts["U"].to(device), parts["V"].to(device)
            buffers = {k: getattr(layer, f"tinylora_{k}") for k in BUFFERS}
            native.fill_slice(buffers, layout, j, U, V)
            self.installed[module] = (layer_name, j, parts["P"].to(device), parts["S"].to(device),
                                      int(parts["G"].reshape(-1)[0]))
        self.install_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        logger.warning("[tinylora] native install: %d modules into %d vLLM layers, %.2f MB", len(by_module),
                       len({self.installed[m][0] for m in by_module}), self.install_bytes / 2**20)

    def _set_v(self, v: torch.Tensor, checksum: int) -> None:
        if not self.installed:
            raise RuntimeError("TinyLoRA native sync received v but this vLLM worker holds no install (its server was "
                               "restarted or its weights were dropped); the rollout would sample the base policy")
        if not torch.isfinite(v).all():
            raise RuntimeError(f"TinyLoRA native sync refused a non-finite v {v.flatten().tolist()}")
        if native.v_checksum(v) != checksum:
            raise RuntimeError(f"TinyLoRA native sync: v's checksum {native.v_checksum(v)} differs from the trainer's "
                               f"{checksum}; the stream was corrupted")
        groups = max(g for *_, g in self.installed.values()) + 1
        if v.dim() != 2 or v.shape[0] < groups:
            raise RuntimeError(f"TinyLoRA native sync: v of shape {tuple(v.shape)} does not cover the {groups} tie "
                               "groups installed")
        touched = set()
        for module, (layer_name, j, P, S, group) in self.installed.items():
            layer = self.layers[layer_name][0]
            layer.tinylora_core_t[j].copy_(native.core_t(v[group].to(P.device), P, S, self.rank))
            touched.add(layer_name)
        for layer_name in touched:
            layer = self.layers[layer_name][0]
            native.mix_({k: getattr(layer, f"tinylora_{k}") for k in BUFFERS})
        self.v, self.checksum = v.clone(), checksum
        self.syncs += 1
        shown = [round(x, 6) for x in v.flatten().tolist()[:64]]
        logger.warning("[tinylora] native sync %d: v=%s checksum %d (matches the trainer's), %d bytes", self.syncs,
                       shown, checksum, v.numel() * v.element_size() + 8)


def attach(model: nn.Module, rank: int) -> NativeModel:
    """Attach (once) the buffers, wrapped GEMMs and receiver to ``model``; route its ``load_weights`` through the
    receiver, which is where verl's GPU weight sync delivers each bucket."""
    state = getattr(model, ATTR, None)
    if state is not None:
        return state
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"TinyLoRA native rank should be an integer >= 1, but the value passed is {rank!r}")
    state = NativeModel(model, rank)
    setattr(model, ATTR, state)
    load_weights = model.load_weights

    def load_weights_through_tinylora(weights, *args, **kwargs):
        rest = state.accept(weights)
        return load_weights(rest, *args, **kwargs) if rest else set()

    model.load_weights = load_weights_through_tinylora
    logger.warning("[tinylora] native mode: %d vLLM layers carry the TinyLoRA update (rank %d)", len(state.layers),
                   rank)
    return state


def state_of(model: nn.Module) -> NativeModel:
    """The model's :class:`NativeModel`; a clear error when vLLM loaded it without the TinyLoRA plugin."""
    state = getattr(model, ATTR, None)
    if state is None:
        raise RuntimeError("this vLLM model has no TinyLoRA native hooks: the server was started without "
                           "additional_config.tinylora_native, or vLLM did not load the tinylora_verl plugin "
                           "(check VLLM_PLUGINS)")
    return state
