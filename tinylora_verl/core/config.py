"""TinyLoRA configuration.

A :class:`TinyLoRAConfig` says which linear layers are adapted, the frozen SVD rank ``r``, the length ``u``
of each trainable vector, how modules are tied to share a vector, and the seed of the fixed projections.
Field names follow peft's ``TinyLoraConfig`` where the meaning is the same (``r``, ``u``, ``target_modules``);
``projection_seed`` is called ``seed`` here because it seeds the only randomness there is.

Validation happens in ``__post_init__`` so a bad value fails where the config is built (on the driver),
not deep inside a Ray worker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TIE_MODES = ("none", "tiled", "structured", "full")
INIT_MODES = ("zeros", "normal")
V_DTYPES = ("float32", "bfloat16", "float16")
HOOK_DTYPES = ("float32", "activation")
CPU_KERNELS = ("auto", "on", "off")
SIGN_CONVENTION = "max-abs-row-of-U-positive"


@dataclass
class TinyLoRAConfig:
    """Configuration of a TinyLoRA adapter (arXiv:2602.04118, section 4).

    Every adapted linear ``W`` (out x in) gets ``ΔW = U Σ (Σᵢ vᵢ Pᵢ) Vᵀ`` from its frozen top-``r`` SVD.
    Only the vectors ``v`` (length ``u``) are trained; a tie group of modules shares one ``v``.

    Args:
        r: frozen SVD rank of each target weight; the paper uses 2 everywhere.
        u: length of each trainable vector ``v`` (ignored when ``budget`` is set).
        tie_mode: ``none`` (one v per module), ``tiled`` (neighbouring modules in layer-major order, any type),
            ``structured`` (neighbouring modules of the same projection type), ``full`` (one v for all).
        tie_size: modules per tie group for ``tiled``/``structured`` (ignored when ``budget`` is set).
        budget: total trainable scalars; when set, ``u`` and ``tie_size`` are chosen by :func:`plan_budget`.
        target_modules: module-name suffixes of the linear layers to adapt.
        seed: seeds the projections ``P`` (per module, from ``(seed, module name)``) and a random ``v`` init.
        init: ``zeros`` (ΔW = 0 at step 0) or ``normal`` (``v ~ N(0, init_std²)``).
        init_std: standard deviation of the ``normal`` init.
        v_dtype: dtype of the trainable vectors; the paper finds float32 best even per byte.
        hook_dtype: precision of the adapter's update ΔW·x (the name predates the fused forward): ``float32``
            computes it in float32 and casts once (into a CPU output, the kernel of ``cpu_kernel`` rounds the
            float32 sum with the output once); ``activation`` computes it in the activations' dtype (bf16/fp16
            models; float32 models are unaffected), which saves the float32 copies of every adapted layer's input
            and output gradient at the cost of ~2 extra roundings of ΔW·x.
        cpu_kernel: the one-pass C++ kernels of the update on a CPU model's float32/bf16 activations (the
            projections ``x V`` / ``g U``, the add into the output, the backward) and the fused linear as one C++
            autograd node over them (:mod:`tinylora_verl.kernels`, built on first use with g++): ``auto`` uses
            them when they build and falls back to torch ops with a warning, ``on`` makes a failed build an error,
            ``off`` never builds them. The same policy covers the Krylov products of the injection's SVDs of CPU
            weights from 2^17 elements (``gram_apply``). GPU tensors always take torch ops.

    ``hook_dtype`` and ``cpu_kernel`` are runtime settings of the machine that runs the adapter; an adapter file
    stores the rest (:data:`tinylora_verl.core.adapter_io.MEANING_FIELDS`).
    """

    r: int = field(default=2, metadata={"help": "Frozen SVD rank of each target weight (paper: 2)."})
    u: int = field(default=1, metadata={"help": "Length of each trainable vector v (ignored with budget)."})
    tie_mode: str = field(
        default="tiled", metadata={"help": f"How modules share a vector: one of {TIE_MODES} (paper's best: tiled)."}
    )
    tie_size: int = field(default=16, metadata={"help": "Modules per tie group for tiled/structured."})
    budget: Optional[int] = field(
        default=None, metadata={"help": "Total trainable scalars; picks u and tie_size by the paper's rule."}
    )
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_TARGET_MODULES, metadata={"help": "Suffixes of the linear modules to adapt."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the fixed projections P and of a random v init."})
    init: str = field(default="zeros", metadata={"help": f"Initial v: one of {INIT_MODES}."})
    init_std: float = field(default=1e-3, metadata={"help": "Standard deviation of the normal v init."})
    v_dtype: str = field(default="float32", metadata={"help": f"dtype of v: one of {V_DTYPES}."})
    hook_dtype: str = field(default="float32", metadata={
        "help": f"Precision of the update ΔW·x: one of {HOOK_DTYPES}; 'activation' runs the rank-r products in a "
                "bf16/fp16 model's own dtype (no activation casts, fused add)."})
    cpu_kernel: str = field(default="auto", metadata={
        "help": f"One-pass C++ kernels for the update's passes over CPU activations, the fused linear as a C++ "
                f"autograd node, and the Krylov products of the SVDs of CPU weights: one of {CPU_KERNELS}; 'auto' "
                "falls back to torch ops if they do not build, 'on' raises, 'off' never builds them."})

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = tuple(s.strip() for s in self.target_modules.split(",") if s.strip())
        else:
            self.target_modules = tuple(self.target_modules)
        _check_int("r", self.r, minimum=1)
        _check_int("u", self.u, minimum=1)
        _check_int("tie_size", self.tie_size, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        if self.budget is not None:
            _check_int("budget", self.budget, minimum=1)
        _check_choice("tie_mode", self.tie_mode, TIE_MODES)
        _check_choice("init", self.init, INIT_MODES)
        _check_choice("v_dtype", self.v_dtype, V_DTYPES)
        _check_choice("hook_dtype", self.hook_dtype, HOOK_DTYPES)
        _check_choice("cpu_kernel", self.cpu_kernel, CPU_KERNELS)
        if not self.target_modules or not all(isinstance(s, str) and s for s in self.target_modules):
            raise ValueError(
                f"`target_modules` should be a non-empty list of module-name suffixes, but the value passed is "
                f"{self.target_modules!r}"
            )
        if not (isinstance(self.init_std, (int, float)) and self.init_std > 0):
            raise ValueError(f"`init_std` should be a positive number, but the value passed is {self.init_std!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TinyLoRAConfig":
        """Build from a plain mapping of config fields; unknown keys are errors (verl's ``lora.tinylora`` block is
        split into these and verl-side switches by :mod:`tinylora_verl.verl.options`)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown TinyLoRA config keys {unknown}; allowed keys are {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` should be an integer >= {minimum}, but the value passed is {value!r}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` should be one of {list(allowed)}, but the value passed is {value!r}")
