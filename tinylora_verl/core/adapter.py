"""Injecting TinyLoRA into a model: shared vectors, ΔW and the merged per-tensor stream.

The base weights are never modified: each target ``nn.Linear`` gets non-persistent float32 buffers
``tinylora_U`` (out, r), ``tinylora_S`` (r,), ``tinylora_V`` (in, r), ``tinylora_P`` (u, r, r), and its calls
compute ``x (W + ΔW)ᵀ`` as ``x Wᵀ + (x V)(Σ M)ᵀ Uᵀ`` with ``M = Σᵢ vᵢ Pᵢ`` (:mod:`tinylora_verl.core.forward` routes the
call, :mod:`tinylora_verl.core.ops` does the arithmetic and its hand-written backward). Non-persistent buffers keep
``state_dict()`` names and contents exactly those of the base checkpoint, so every consumer of HF names (vLLM's
loader, ``save_pretrained``) sees the original model. The trainable vectors live on the returned
:class:`TinyLoRAAdapter`, outside the model tree, one ``nn.Parameter`` per tie group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from .adapter_io import export_lora, load_adapter_state, read_adapter, save_adapter, saved_config
from .config import SIGN_CONVENTION, TinyLoRAConfig
from .factors import dense_delta, mix, projections, top_r_svd_batch
from .fingerprint import FULL, fingerprint
from .forward import AdapterForwards, Routing
from .tying import TiePlan, build_tie_plan, canonical_order, plan_budget

logger = logging.getLogger(__name__)

_BUFFERS = ("tinylora_U", "tinylora_S", "tinylora_V", "tinylora_P")
def find_target_modules(model: nn.Module, target_modules: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Linear modules whose name ends with one of ``target_modules``; an error lists the model's linears if none."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == s or name.endswith("." + s) for s in target_modules):
            found[name] = module
    if not found:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"target_modules {list(target_modules)} match no nn.Linear in {type(model).__name__}; "
            f"its linear module suffixes are {linears}"
        )
    return found


@dataclasses.dataclass
class MergeStats:
    """What one pass of :meth:`TinyLoRAAdapter.merged_named_tensors` sent: counts, bytes, time, fidelity."""

    tensors: int = 0
    merged: int = 0
    bytes: int = 0
    seconds: float = 0.0
    delta_sq: float = 0.0
    delivered_sq: float = 0.0

    @property
    def fidelity(self) -> float:
        """``‖cast(W+ΔW) − cast(W)‖ / ‖ΔW‖`` over all merged weights (1.0 when ΔW = 0, NaN when ΔW is not finite)."""
        return _ratio(self.delivered_sq, self.delta_sq)


def _ratio(delivered_sq: float, delta_sq: float) -> float:
    """``sqrt(delivered_sq / delta_sq)``: 1.0 for an exactly zero ΔW (delivered exactly), NaN for a non-finite one."""
    if not (math.isfinite(delivered_sq) and math.isfinite(delta_sq)):
        return float("nan")
    return (delivered_sq / delta_sq) ** 0.5 if delta_sq > 0 else 1.0


@dataclasses.dataclass(frozen=True)
class ModuleFidelity:
    """How much of ΔW survives a cast of the merged weight; ``fidelity = ‖cast(W+ΔW) − cast(W)‖ / ‖ΔW‖``."""

    name: str
    fidelity: float
    rel_error: float
    delta_norm: float
    delivered_norm: float


class TinyLoRAAdapter(nn.Module):
    """Handle returned by :func:`inject_tinylora`.

    Its only parameters are the tie-group vectors (``parameters()`` gives exactly what to train); the model is
    referenced, not owned, so ``adapter.state_dict()`` is the few-byte trained state.
    """

    def __init__(self, model: nn.Module, config: TinyLoRAConfig, plan: TiePlan, modules: dict[str, nn.Linear]):
        super().__init__()
        object.__setattr__(self, "model", model)
        self.config = config
        self.tie_plan = plan
        self._modules_by_name = {n: modules[n] for n in plan.module_names}
        self._group_index = {n: g for g, names in enumerate(plan.groups) for n in names}
        dtype = getattr(torch, config.v_dtype)
        device = next(iter(modules.values())).weight.device
        on_meta = device.type == "meta"
        device = torch.device("cpu") if on_meta else device
        gen = torch.Generator(device="cpu").manual_seed(config.seed)
        vectors = []
        for _ in plan.groups:
            if config.init == "zeros":
                v = torch.zeros(plan.u, dtype=torch.float32)  # (u,)
            else:
                v = torch.randn(plan.u, generator=gen, dtype=torch.float32) * config.init_std  # (u,)
            vectors.append(nn.Parameter(v.to(device=device, dtype=dtype)))
        self.vectors = nn.ParameterList(vectors)
        self.enabled = True
        # Only a rank holding real weights can fingerprint them; verl saves adapters from rank 0, which does.
        self.fingerprint = "" if on_meta else fingerprint(self._modules_by_name)
        self.forwards = AdapterForwards(self.routing())

    def routing(self) -> Routing:
        """What the forwards read: the modules, their groups, the live table of v, the on/off switch, settings."""
        return Routing(modules=self._modules_by_name, group_of=self._group_index,
                       vectors=self.vectors._parameters, enabled=lambda: self.enabled,
                       activation=self.config.hook_dtype == "activation", cpu_kernel=self.config.cpu_kernel)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model (ΔW = 0) inside the block, e.g. as the KL reference policy."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    # ------------------------------------------------------------------ inspection
    @property
    def module_names(self) -> list[str]:
        return list(self._modules_by_name)

    def named_adapted_modules(self) -> Iterator[tuple[str, nn.Linear]]:
        return iter(self._modules_by_name.items())

    def forward_mode(self, name: str) -> Optional[str]:
        """How module ``name`` runs: ``"fused"`` (its forward is the TinyLoRA linear), ``"hook"`` (its own forward
        plus a hook adding ΔW·x: linears that are not a plain ``nn.Linear``), or None after :meth:`remove`."""
        return self.forwards.mode_of(self._check_name(name))

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.vectors)

    def group_of(self, name: str) -> int:
        """Index of module ``name``'s tie group (its v is ``vectors[group_of(name)]``)."""
        return self._group_index[self._check_name(name)]

    def vector_of(self, name: str) -> nn.Parameter:
        return self.vectors[self._group_index[self._check_name(name)]]

    def fingerprint_of(self, kind: str) -> str:
        """The base's fingerprint of ``kind`` (:mod:`tinylora_verl.core.fingerprint`); the full one is computed at
        injection, another on demand (to check a file written with it)."""
        return self.fingerprint if kind == FULL else fingerprint(self._modules_by_name, kind)

    def _check_name(self, name: str) -> str:
        if name not in self._modules_by_name:
            raise KeyError(f"{name!r} is not a TinyLoRA module; adapted modules include {self.module_names[:3]}...")
        return name

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U (out, r), S (r,), V (in, r), P (u, r, r))`` of module ``name``."""
        m = self._modules_by_name[self._check_name(name)]
        return m.tinylora_U, m.tinylora_S, m.tinylora_V, m.tinylora_P

    def delta_weight(self, name: str) -> torch.Tensor:
        """Dense ``ΔW = U diag(S) (Σᵢ vᵢ Pᵢ) Vᵀ`` (out, in) in float32, for module ``name``."""
        U, S, V, P = self.factors(name)
        return dense_delta(U, S, V, mix(self.vector_of(name).detach(), P))  # (out, in)

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact rank-r LoRA factors ``B = U Σ M`` (out, r) and ``A = Vᵀ`` (r, in) with ``B A = ΔW``."""
        U, S, V, P = self.factors(name)
        M = mix(self.vector_of(name).detach(), P)  # (r, r)
        return (U * S) @ M, V.T.contiguous()

    def check_finite(self, what: str) -> None:
        """Raise ``RuntimeError`` when any v is NaN or infinite: nothing derived from it may leave the trainer."""
        v = torch.cat([p.detach().float().reshape(-1) for p in self.vectors])
        if not torch.isfinite(v).all():
            raise RuntimeError(f"TinyLoRA's v holds non-finite values {v.tolist()}: refusing to build the {what} from "
                               "it (a rollout or export would be poisoned)")

    # ------------------------------------------------------------------ merging
    def weight_names(self) -> dict[str, str]:
        """Map ``<module>.weight`` tensor names (HF checkpoint names) to module names."""
        return {f"{n}.weight": n for n in self._modules_by_name}

    def _merge(self, name: str, weight: torch.Tensor, dtype: torch.dtype):
        """``(cast(W + ΔW), ΔW, cast(W + ΔW) − cast(W))`` for module ``name``: the sum in float32, cast once."""
        base = weight.detach().to(torch.float32)  # (out, in)
        delta = self.delta_weight(name).to(base.device)  # (out, in)
        merged = (base + delta).to(dtype)
        delivered = merged.to(torch.float32) - base.to(dtype).to(torch.float32)  # (out, in)
        return merged, delta, delivered

    def merged_named_tensors(
        self,
        named_tensors: Optional[Iterable[tuple[str, torch.Tensor]]] = None,
        dtype: Optional[torch.dtype] = None,
        stats: Optional["MergeStats"] = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for every tensor, target weights replaced by ``cast(W + ΔW)``.

        The sum is formed in float32 from the pristine base weight and cast once to ``dtype`` (default: the
        weight's own dtype); nothing is merged in place, so there is no merge/unmerge drift. ``named_tensors``
        defaults to the model's ``state_dict()`` (HF names for a HF model); verl passes its own stream. A
        stream that ends without carrying every target weight raises: a rename upstream must not silently
        send unmerged weights. ``stats`` (optional) accumulates bytes, seconds and merge fidelity.
        """
        self.check_finite("merged stream")
        index = self.weight_names()
        stream = self.model.state_dict().items() if named_tensors is None else named_tensors
        stats = stats if stats is not None else MergeStats()
        start = time.perf_counter()
        seen = set()
        for name, tensor in stream:
            module = index.get(name)
            if module is not None:
                merged, delta, delivered = self._merge(module, tensor, dtype or tensor.dtype)
                stats.delta_sq += delta.square().sum().item()
                stats.delivered_sq += delivered.square().sum().item()
                seen.add(name)
                tensor = merged
            elif dtype is not None and tensor.is_floating_point():
                tensor = tensor.detach().to(dtype)
            stats.tensors += 1
            stats.bytes += tensor.numel() * tensor.element_size()
            yield name, tensor
        stats.merged = len(seen)
        stats.seconds = time.perf_counter() - start
        missing = sorted(set(index) - seen)
        if missing:
            raise RuntimeError(
                f"the weight stream ended without {len(missing)} TinyLoRA target weights (first: {missing[0]}); "
                "they would have been sent unmerged"
            )

    def lora_config(self) -> dict:
        """peft ``LoraConfig`` fields matching :meth:`lora_named_tensors`: rank r and ``lora_alpha = r``, so the
        LoRA scaling ``alpha / r`` is exactly 1 (peft and vLLM both read these)."""
        r = self.config.r
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
                "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
                "init_lora_weights": True, "inference_mode": True, "target_modules": sorted(self.module_names),
                "modules_to_save": None}

    def lora_named_tensors(self, dtype: torch.dtype = torch.float32,
                           stats: Optional["MergeStats"] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ΔW as its exact rank-r LoRA under peft names, on CPU in ``dtype``:

            base_model.model.<module>.lora_A.weight = Vᵀ        (r, in)
            base_model.model.<module>.lora_B.weight = U Σ M     (out, r),   B A = ΔW

        ``stats`` accumulates bytes and seconds, and as fidelity ``‖cast(B) cast(A)‖ / ‖B A‖`` (how much of ΔW a
        consumer holding the factors in ``dtype`` serves), from r×r Gram matrices rather than out×in products.
        """
        self.check_finite("LoRA stream")
        stats = stats if stats is not None else MergeStats()
        start = time.perf_counter()
        for name in self.module_names:
            B, A = (t.detach().to("cpu", torch.float32) for t in self.lora_factors(name))  # (out, r), (r, in)
            Bc, Ac = B.to(dtype), A.to(dtype)
            Bf, Af = Bc.to(torch.float32), Ac.to(torch.float32)
            # ‖B A‖² = tr((BᵀB)(A Aᵀ)).
            stats.delta_sq += torch.trace((B.T @ B) @ (A @ A.T)).item()
            stats.delivered_sq += torch.trace((Bf.T @ Bf) @ (Af @ Af.T)).item()
            for suffix, tensor in (("lora_A", Ac), ("lora_B", Bc)):
                stats.tensors += 1
                stats.bytes += tensor.numel() * tensor.element_size()
                yield f"base_model.model.{name}.{suffix}.weight", tensor.contiguous()
        stats.merged = len(self.module_names)
        stats.seconds = time.perf_counter() - start

    def merge_fidelity(self, dtype: torch.dtype) -> tuple[float, list[ModuleFidelity]]:
        """Overall and per-module ``‖cast(W+ΔW) − cast(W)‖ / ‖ΔW‖`` for merged weights stored in ``dtype``.

        In bf16 a small ΔW mostly rounds away (fidelity ≪ 1); ``rel_error = ‖delivered − ΔW‖ / ‖ΔW‖`` says how
        wrong what arrives is. A zero ΔW is delivered exactly (fidelity 1).
        """
        rows, tot_delta, tot_delivered = [], 0.0, 0.0
        for name, m in self._modules_by_name.items():
            _, delta, delivered = self._merge(name, m.weight, dtype)
            dn, gn = delta.norm().item(), delivered.norm().item()
            err = (delivered - delta).norm().item()
            rel = float("nan") if not math.isfinite(dn) else (err / dn if dn > 0 else 0.0)
            rows.append(ModuleFidelity(name, _ratio(gn**2, dn**2), rel, dn, gn))
            tot_delta += dn**2
            tot_delivered += gn**2
        return _ratio(tot_delivered, tot_delta), rows

    # ------------------------------------------------------------------ persistence and teardown
    def save_adapter(self, path: str) -> None:
        save_adapter(self, path)

    def export_lora(self, path: str, dtype: torch.dtype = torch.float32) -> None:
        export_lora(self, path, dtype=dtype)

    def remove(self) -> None:
        """Remove forwards, hooks and buffers: the model is exactly the base model again."""
        self.forwards.remove()
        for m in self._modules_by_name.values():
            for b in _BUFFERS:
                if hasattr(m, b):
                    delattr(m, b)


def resolve_plan(config: TinyLoRAConfig, names: list[str]) -> TiePlan:
    """Turn a config (with or without a budget) into a concrete tie plan over ``names``."""
    u, tie_size = config.u, config.tie_size
    if config.budget is not None:
        bp = plan_budget(names, config.budget, config.tie_mode, config.target_modules)
        u, tie_size = bp.u, bp.tie_size
    return build_tie_plan(names, config.target_modules, config.tie_mode, tie_size, u)


def inject_tinylora(model: nn.Module, config: TinyLoRAConfig, factors: Optional[dict] = None,
                    device: Optional[torch.device] = None, threads: Optional[int] = None) -> TinyLoRAAdapter:
    """Freeze ``model``, attach TinyLoRA to its target linears, return the adapter handle.

    ``factors`` optionally maps module names to precomputed ``(U, S, V)`` (e.g. broadcast from rank 0); the
    other targets' top-r SVDs are computed here in float32, same-shape weights batched (:func:`top_r_svd_batch`),
    on ``device`` (default: where the weights are; a GPU for weights still in host memory) with ``threads`` intra-op
    threads on the CPU (default: the caller's setting).
    """
    modules = find_target_modules(model, config.target_modules)
    names = canonical_order(list(modules), config.target_modules)
    plan = resolve_plan(config, names)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        if any(hasattr(modules[name], b) for b in _BUFFERS):
            raise ValueError(f"module {name!r} already carries TinyLoRA buffers; call adapter.remove() first")
    factors = dict(factors or {})
    todo = [n for n in names if n not in factors and modules[n].weight.device.type != "meta"]
    start = time.perf_counter()
    factors.update(zip(todo, top_r_svd_batch([modules[n].weight for n in todo], config.r,
                                             cpu_kernel=config.cpu_kernel, device=device, threads=threads)))
    if todo:
        logger.info("inject_tinylora: top-%d SVD of %d weights in %.2f s", config.r, len(todo),
                    time.perf_counter() - start)
    for name in names:
        m = modules[name]
        dev = m.weight.device
        if name in factors:
            U, S, V = factors[name]
        else:
            # Ranks built on meta (verl's non-zero ranks) get placeholders; FSDP's load broadcasts rank 0's values.
            out_f, in_f = m.weight.shape
            U, S, V = torch.empty(out_f, config.r), torch.empty(config.r), torch.empty(in_f, config.r)
        m.register_buffer("tinylora_U", U.to(dev, torch.float32), persistent=False)
        m.register_buffer("tinylora_S", S.to(dev, torch.float32), persistent=False)
        m.register_buffer("tinylora_V", V.to(dev, torch.float32), persistent=False)
        P = projections(config.seed, name, plan.u, config.r)  # (u, r, r)
        m.register_buffer("tinylora_P", P.to(dev), persistent=False)
    resolved = dataclasses.replace(config, u=plan.u, tie_size=plan.tie_size)
    return TinyLoRAAdapter(model, resolved, plan, modules)


def load_adapter(path: str, model: nn.Module, factors=None, **runtime) -> TinyLoRAAdapter:
    """Inject TinyLoRA into ``model`` as the adapter file at ``path`` describes and set ``v`` bit-exactly from it.

    ``runtime`` holds this machine's settings (``cpu_kernel``, ``hook_dtype``); the file stores none. Raises
    ``ValueError`` when the model's target weights are not the ones the adapter was trained on, or its module list
    or tie plan differ; the model is then left without TinyLoRA.
    """
    v, meta = read_adapter(path)
    adapter = inject_tinylora(model, saved_config(meta, v.dtype, **runtime), factors=factors)
    try:
        load_adapter_state(adapter, path)
    except ValueError:
        adapter.remove()
        raise
    return adapter


__all__ = [
    "MergeStats",
    "ModuleFidelity",
    "SIGN_CONVENTION",
    "TinyLoRAAdapter",
    "find_target_modules",
    "inject_tinylora",
    "load_adapter",
    "resolve_plan",
]
