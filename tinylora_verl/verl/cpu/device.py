"""A stand-in for ``torch.cuda`` on the CPU platform: what verl reaches through ``get_torch_device()``.

torch.cpu answers what it has; memory queries report zero (there is no device memory to count), ``mem_get_info``
reports host memory, and seeding and RNG state go to torch's CPU generator.
"""

from __future__ import annotations

import os
import platform as _host_platform
import types
from typing import Any


class CpuDeviceModule(types.ModuleType):
    """Stand-in for ``torch.cuda`` that verl reaches via ``get_torch_device()``: torch.cpu plus no-op memory calls."""

    def __init__(self):
        super().__init__("tinylora_verl_cpu_device")
        import torch

        self._torch = torch

    def __getattr__(self, name: str):
        cpu = self.__dict__["_torch"].cpu
        if hasattr(cpu, name):
            return getattr(cpu, name)
        raise AttributeError(
            f"CPU device module has no {name!r} (torch.cpu lacks it and tinylora_verl does not stub it)"
        )

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def current_device(self) -> str:
        return "cpu"

    def set_device(self, device: Any) -> None:
        return None

    def synchronize(self, device: Any = None) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def ipc_collect(self) -> None:
        return None

    def memory_allocated(self, device: Any = None) -> int:
        return 0

    def memory_reserved(self, device: Any = None) -> int:
        return 0

    def max_memory_allocated(self, device: Any = None) -> int:
        return 0

    def max_memory_reserved(self, device: Any = None) -> int:
        return 0

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        return None

    def memory_stats(self, device: Any = None) -> dict:
        return {}

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page

    def set_per_process_memory_fraction(self, fraction: float, device: Any = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        self._torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        self._torch.manual_seed(seed)

    def get_rng_state(self, device: Any = None):
        return self._torch.get_rng_state()

    def set_rng_state(self, state, device: Any = None) -> None:
        self._torch.set_rng_state(state)

    def get_device_name(self, device: Any = None) -> str:
        return _host_platform.processor() or "cpu"


__all__ = ["CpuDeviceModule"]
