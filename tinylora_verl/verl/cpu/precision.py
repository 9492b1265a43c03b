"""Which compute dtype a CPU runs fast: bf16 only with native bf16 matrix instructions.

Without AVX512-BF16 or AMX, torch's and vLLM's bf16 GEMMs fall back to scalar loops (0.3 against 62 GFLOP/s for a
float32 GEMM on a 2-core AVX2 EPYC: docs/benchmarks.md), so the CPU overlay (``${tinylora_cpu_dtype:}``) and the
evaluation's vLLM backend compute in float32 there. Torch-free and side-effect-free: imported by the driver's
entry point and by workers alike.
"""

from __future__ import annotations

import os
from pathlib import Path

CPU_DTYPE_ENV = "TINYLORA_VERL_CPU_DTYPE"
CPU_DTYPES = ("bfloat16", "float32")
# CPU features with native bf16 matrix instructions; without them torch's and vLLM's bf16 GEMMs run scalar loops.
_BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_dtype() -> str:
    """The compute dtype of the CPU overlay: ``bfloat16`` where the CPU has native bf16 matrix instructions
    (AVX512-BF16, AMX), else ``float32``; ``TINYLORA_VERL_CPU_DTYPE`` forces either."""
    forced = os.environ.get(CPU_DTYPE_ENV, "").strip()
    if forced:
        if forced not in CPU_DTYPES:
            raise ValueError(f"{CPU_DTYPE_ENV}={forced!r} is not allowed; use one of {list(CPU_DTYPES)} or unset it")
        return forced
    return "bfloat16" if _BF16_CPU_FLAGS & cpu_flags() else "float32"


__all__ = ["CPU_DTYPES", "CPU_DTYPE_ENV", "cpu_dtype", "cpu_flags"]
