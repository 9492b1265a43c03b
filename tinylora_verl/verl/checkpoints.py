"""TinyLoRA's actor checkpoints: file names, RNG state, and the retention of old checkpoints.

An actor checkpoint (``<run>/global_step_N/actor``) holds :data:`ADAPTER_FILE` (rank 0's adapter file: v and what it
means) and one :data:`STATE_FILE` per rank (optimizer, scheduler, RNG state). verl writes
``<run>/latest_checkpointed_iteration.txt`` after every rank has written, so a crash mid-save leaves the previous
checkpoint as the one to resume from.
"""

from __future__ import annotations

import os
import random
import re

import numpy as np
import torch

ADAPTER_FILE = "tinylora_adapter.safetensors"
STATE_FILE = "tinylora_state_rank_{rank}.pt"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
STEP_DIR = re.compile(r"^global_step_(\d+)$")


def rng_state() -> dict:
    """Every generator a step draws from: torch's CPU and (when present) CUDA generators, numpy's and Python's."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(), "random": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved (checkpoints of earlier versions hold the CPU generator only)."""
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("numpy") is not None:
        np.random.set_state(state["numpy"])
    if state.get("random") is not None:
        random.setstate(state["random"])


def checkpoints_beyond(local_path: str, max_ckpt_to_keep) -> list[str]:
    """The actor checkpoint folders to remove so that at most ``max_ckpt_to_keep`` remain, ``local_path``
    (``<run>/global_step_N/actor``) the newest; none when the limit is unset or not positive (keep all)."""
    if isinstance(max_ckpt_to_keep, bool) or not isinstance(max_ckpt_to_keep, int) or max_ckpt_to_keep <= 0:
        return []
    actor = os.path.basename(os.path.normpath(local_path))
    step_dir = os.path.dirname(os.path.normpath(local_path))
    run_dir = os.path.dirname(step_dir)
    match = STEP_DIR.match(os.path.basename(step_dir))
    if match is None:
        return []
    current = int(match.group(1))
    older = []
    for name in os.listdir(run_dir):
        m = STEP_DIR.match(name)
        path = os.path.join(run_dir, name, actor)
        if m and int(m.group(1)) < current and os.path.isfile(os.path.join(path, ADAPTER_FILE)):
            older.append((int(m.group(1)), path))
    older.sort()
    return [path for _, path in older[:max(0, len(older) + 1 - max_ckpt_to_keep)]]


__all__ = ["ADAPTER_FILE", "STATE_FILE", "STEP_DIR", "TRACKER_FILE", "checkpoints_beyond", "rng_state",
           "set_rng_state"]
