"""Identity of a base model's target weights: the fingerprint an adapter file carries.

:data:`FULL` is a sha256 over every target weight's float32 values, with its name and shape, in name order, so a
change to any element of any target weight changes it. bf16 to float32 is exact, so the same base loaded in bf16
(training) or float32 (export) gives the same fingerprint. It is computed once, at injection, on the rank holding
real weights; the weights are hashed in parallel threads (hashlib and torch's copies release the GIL), one float32
copy per thread at a time. Its cost beside the injection's SVDs is measured by the injection benchmark.

:data:`SAMPLED` is what adapter files written before stored (4096 strided values per weight); it is kept only to
check those files, and misses a change to the weights between its samples.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Optional

import torch
from torch import nn

FULL = "sha256-float32"
SAMPLED = "sampled-4096"
KINDS = (FULL, SAMPLED)
_SAMPLES = 4096


def _weight_digest(name: str, weight: torch.Tensor) -> bytes:
    w = weight.detach()
    h = hashlib.sha256(f"{name}:{tuple(w.shape)};".encode())
    h.update(w.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.digest()


def _sampled(modules: Mapping[str, nn.Module]) -> str:
    h = hashlib.sha256()
    for name in sorted(modules):
        w = modules[name].weight.detach()
        flat = w.reshape(-1)
        step = max(1, flat.numel() // _SAMPLES)
        sample = flat[::step][:_SAMPLES].to(device="cpu", dtype=torch.float32).contiguous()
        h.update(f"{name}:{tuple(w.shape)};".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(modules: Mapping[str, nn.Module], kind: str = FULL, threads: Optional[int] = None) -> str:
    """The fingerprint of ``modules`` ' weights (``kind`` one of :data:`KINDS`); ``threads`` hash in parallel
    (default: the cores this process may use, at most 8)."""
    if kind not in KINDS:
        raise ValueError(f"fingerprint kind {kind!r} is not one of {list(KINDS)}")
    if kind == SAMPLED:
        return _sampled(modules)
    names = sorted(modules)
    workers = threads or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        digests = list(pool.map(lambda n: _weight_digest(n, modules[n].weight), names))
    return hashlib.sha256(b"".join(digests)).hexdigest()


__all__ = ["FULL", "KINDS", "SAMPLED", "fingerprint"]
