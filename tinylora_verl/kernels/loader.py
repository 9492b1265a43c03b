"""The CPU kernels of the adapter's passes over activations, built on first use from ``csrc/``.

Why kernels: on the CPU the adapter's overhead is bound by passes over activation-sized tensors and by per-op
dispatch, not by FLOPs (the GEMMs are rank r = 2; measurements in docs/benchmarks.md). With torch ops the update
``y += (a core) bt`` is a (tokens, r) x (r, r) GEMM, a K = r GEMM into a fresh (tokens, n) tensor and an add (plus a
cast into a bf16 ``y``), and the projections ``h = x V`` and ``gU = g U`` of a bf16 model first cast the activation
into a fresh float32 copy. Each kernel is one pass (:class:`Kernels`): read, sum in float32, round once, write. Into
a bf16 ``y`` that is also one rounding fewer than casting the float32 update and adding it. Over them, ``linear`` is
the whole fused node in C++ (``csrc/fused_linear.cpp``), so forward and backward run without Python. The
injection's block Lanczos (:mod:`tinylora_verl.core.factors`) is bound by reading each weight twice per step in two
thin GEMMs; ``gram_apply`` (``csrc/gram_apply.cpp``) reads each row of a tall weight once.

It is built with torch's own extension builder (g++ and ninja, once per machine and torch version; the build
directory is keyed by the source, the flags and the CPU's feature flags, since it is built with ``-march=native``)
into torch's extension cache (``TORCH_EXTENSIONS_DIR``). ``cpu_kernel`` in
:class:`~tinylora_verl.core.config.TinyLoRAConfig` picks the policy (:data:`MODES`): ``auto`` uses it when it builds
and falls back to the torch ops with one warning when it does not, ``on`` raises instead, ``off`` never builds it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

CSRC = Path(__file__).parent / "csrc"
# The kernels, the fused linear's autograd node and the group's, the Lanczos products of factors.py, and the shared
# headers (hashed into the name, not compiled).
SOURCES = (CSRC / "rank_r_update.cpp", CSRC / "fused_linear.cpp", CSRC / "group_linear.cpp", CSRC / "gram_apply.cpp")
HEADERS = (CSRC / "rank_r_kernels.h", CSRC / "fused_linear.h")
# -fopenmp: at::parallel_for is header code that runs serially without it; the extension then links the libgomp
# torch already loaded (same soname), not a second OpenMP runtime.
CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)
MAX_RANK = 16
# The policies of TinyLoRAConfig.cpu_kernel (core/config.py's CPU_KERNELS; tests/kernels check they agree).
MODES = ("auto", "on", "off")

class Kernels(NamedTuple):
    """The compiled ops (``torch.ops.tinylora_verl.*``), float32 factors and float32 or bf16 activations:

    - ``add_rank_r_(y, a, core, bt)``: ``y ← y + (a core) bt`` in place.
    - ``project(x, vt) -> h``: ``h = x vtᵀ`` (rows, k) float32, ``x`` read in its own dtype.
    - ``rank_r_backward_(gx, g, h, ut, ct, vt) -> hᵀ gU``: with ``gU = g utᵀ``, ``gx ← gx + gU ctᵀ vt`` in place
      (``gx`` may be None) and ``hᵀ gU`` (r, r) summed in float64; ``gU`` itself is never materialised.
    - ``linear(x, weight, bias, v, h, ut, vt, pst, cast_dtype) -> y``: the whole fused TinyLoRA linear
      (:class:`tinylora_verl.core.ops.TinyLoRALinear`'s arithmetic) as one C++ autograd node over these kernels,
      forward and backward without Python (``csrc/fused_linear.cpp``).
    - ``group_linear(x, weights, biases, vs, uts, vt, psts, cast_dtype) -> ys``: the fused linears of k modules
      that read the same ``x`` (q/k/v, gate/up) as one node, ``vt`` their stacked ``Vᵀ`` (k·r, in): one
      projection, and in backward one pass adding the k updates into ``∂L/∂x`` (``csrc/group_linear.cpp``).
    - ``gram_apply(a, x, tall) -> w``: ``w = x aᵀa`` (tall) or ``x a aᵀ`` (wide) for a batch ``a`` (B, out, in)
      and blocks ``x`` (B, b, s), float32: the products of :mod:`tinylora_verl.core.factors`'s block Lanczos, each
      row of a tall ``a`` read once instead of twice (``csrc/gram_apply.cpp``).
    """

    add_rank_r_: Callable[..., None]
    project: Callable[..., torch.Tensor]
    rank_r_backward_: Callable[..., torch.Tensor]
    linear: Callable[..., torch.Tensor]
    group_linear: Callable[..., list[torch.Tensor]]
    gram_apply: Callable[..., torch.Tensor]


OPS = Kernels._fields
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build_name() -> str:
    """The extension's name: changes with the source, the flags, torch, Python and the CPU's features."""
    key = "\n".join([*(p.read_text() for p in SOURCES + HEADERS), " ".join(CFLAGS + LDFLAGS), torch.__version__,
                     sys.version, platform.machine(), _cpu_flags()])
    return "tinylora_verl_cpu_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def build_directory(name: str) -> Path:
    """Where torch's extension builder keeps ``name``: ``TORCH_EXTENSIONS_DIR`` or its default cache root."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / name


def _build() -> Kernels:
    from torch.utils import cpp_extension

    if not all(hasattr(torch.ops.tinylora_verl, op) for op in OPS):
        name = build_name()
        directory = build_directory(name)
        if not (directory / f"{name}.so").exists():
            print(f"[tinylora_verl] building the CPU kernel into {directory} (once per machine and torch version)",
                  file=sys.stderr, flush=True)
        directory.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=list(CFLAGS),
                           extra_ldflags=list(LDFLAGS), build_directory=str(directory), is_python_module=False,
                           verbose=False)
    return Kernels(*(getattr(torch.ops.tinylora_verl, op) for op in OPS))


def load(mode: str = "auto") -> Optional[Kernels]:
    """The :class:`Kernels` under ``mode`` (one of :data:`MODES`), or None.

    The first call builds it (or finds it built); a failed build is remembered for the process: ``auto`` then
    warns once and returns None, ``on`` raises with the build's error.
    """
    if mode not in MODES:
        raise ValueError(f"`cpu_kernel` should be one of {list(MODES)}, but the value passed is {mode!r}")
    if mode == "off":
        return None
    with _lock:
        if "op" not in _state and "error" not in _state:
            try:
                _state["op"] = _build()
            except Exception as e:  # a missing compiler or ninja, a failed compile or load
                _state["error"] = f"{type(e).__name__}: {e}"
                if mode == "auto":
                    warnings.warn(f"tinylora_verl: the CPU kernel did not build, using torch ops instead "
                                  f"(cpu_kernel='off' silences this; 'on' makes it an error): {_state['error']}",
                                  RuntimeWarning, stacklevel=2)
    if "error" in _state:
        if mode == "on":
            raise RuntimeError(f"cpu_kernel='on' but the TinyLoRA CPU kernel is unavailable: {_state['error']}")
        return None
    return _state["op"]  # type: ignore[return-value]


def takes_factors(device: torch.device, dtype: torch.dtype, r: int) -> bool:
    """Whether a layout of rank-``r`` factors in ``dtype`` on ``device`` can use the kernel (float32, CPU)."""
    return device.type == "cpu" and dtype == torch.float32 and r <= MAX_RANK


def reads(t: torch.Tensor) -> bool:
    """Whether the kernels take ``t`` as an activation: a 2-D float32 or bf16 CPU tensor with contiguous rows."""
    return (t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) and t.dim() == 2
            and t.stride(-1) == 1 and t.stride(0) >= t.shape[1])


def applies(y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor) -> bool:
    """Whether :func:`load` 's kernel computes ``y += (a core) bt`` for these tensors (else the torch ops do)."""
    return (reads(y) and y.is_contiguous() and a.dtype is torch.float32 and bt.dtype is torch.float32
            and a.shape[1] <= MAX_RANK and a.stride(-1) == 1)


__all__ = ["Kernels", "MAX_RANK", "MODES", "OPS", "SOURCES", "applies", "build_directory", "build_name", "load", "reads",
           "takes_factors"]
