"""Adapter files: the few-byte trained state, and the exact peft LoRA export.

An adapter file is one safetensors file holding ``v`` as a ``(groups, u)`` tensor, with JSON in the safetensors
metadata: the config fields that give v its meaning (``r``, ``u``, the tie mode and size, seed, target modules;
:data:`MEANING_FIELDS`) and the budget for display, the sign convention, a hash of the ordered tie plan (rebuilt from
the model and checked against it) and a fingerprint of the base's target weights. Runtime settings (``cpu_kernel``,
``hook_dtype``) are not stored: they belong to the machine that loads it. Files written before that stored the whole
config; reading keeps only these fields. For Qwen2.5-7B at 13 parameters a file is well under 1 KB.

Every file carries a sha256 checksum over v and this metadata: a file whose metadata or v was edited or damaged is
refused with a message that says so (files written before checksums load with a warning). A v with a NaN or an
infinity is refused on save and on read. This module reads and writes files and checks a file against an adapter;
building the adapter a file describes is :func:`tinylora_verl.core.adapter.load_adapter`'s job.

Because ``ΔW = (U Σ M)(Vᵀ)`` is exactly rank ``r``, it is also a LoRA with ``B = U Σ M``, ``A = Vᵀ`` and
``lora_alpha = r`` (scaling 1); :func:`export_lora` writes that as a peft adapter folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import SIGN_CONVENTION, TinyLoRAConfig
from .fingerprint import FULL, SAMPLED

FORMAT = "tinylora-v1"
# Config fields that change what a saved v means; the budget is stored for display only.
MEANING_FIELDS = ("r", "u", "tie_mode", "tie_size", "seed", "target_modules")


class SavedAdapter(Protocol):
    """What this module reads of an adapter (:class:`~tinylora_verl.core.adapter.TinyLoRAAdapter`)."""

    config: TinyLoRAConfig
    tie_plan: Any
    fingerprint: str
    vectors: Any

    def lora_named_tensors(self, dtype: torch.dtype) -> Any: ...

    def fingerprint_of(self, kind: str) -> str: ...

    def lora_config(self) -> dict: ...


def plan_hash(groups) -> str:
    """Hash of the tie plan's groups (who shares which v), in order."""
    return hashlib.sha256("\n".join("|".join(g) for g in groups).encode()).hexdigest()[:16]


def meaning(config: TinyLoRAConfig) -> dict[str, Any]:
    """The config as an adapter file stores it: :data:`MEANING_FIELDS` and the budget."""
    d = config.to_dict()
    return {k: d[k] for k in (*MEANING_FIELDS, "budget")}


def adapter_metadata(adapter: SavedAdapter) -> dict[str, str]:
    plan = adapter.tie_plan
    meta = {
        "config": meaning(adapter.config),
        "num_modules": len(plan.module_names),
        "num_groups": len(plan.groups),
        "plan_hash": plan_hash(plan.groups),
        "base_fingerprint": adapter.fingerprint,
        "fingerprint_kind": FULL,
        "sign_convention": SIGN_CONVENTION,
    }
    return {"format": FORMAT, "tinylora": json.dumps(meta, sort_keys=True, separators=(",", ":"))}


def checksum(v: torch.Tensor, tinylora_meta: str) -> str:
    """sha256 of v (its dtype, shape and bytes) and the file's ``tinylora`` metadata string."""
    h = hashlib.sha256(f"{v.dtype}:{tuple(v.shape)};".encode())
    h.update(v.contiguous().view(torch.uint8).numpy().tobytes())
    h.update(tinylora_meta.encode())
    return h.hexdigest()


def nonfinite(v: torch.Tensor) -> int:
    """How many values of ``v`` are NaN or infinite."""
    return int((~torch.isfinite(v.float())).sum())


def save_adapter(adapter: SavedAdapter, path: str) -> None:
    """Write ``v`` (groups, u) and the config to ``path`` (a ``.safetensors`` file, readable like other checkpoint
    files: 0644); creates parent folders. A non-finite v is refused: a checkpoint must never hold one."""
    v = torch.stack([p.detach().to("cpu") for p in adapter.vectors]).contiguous()  # (groups, u)
    bad = nonfinite(v)
    if bad:
        raise ValueError(f"refusing to save a TinyLoRA adapter to {path}: {bad} of v's {v.numel()} values are NaN "
                         f"or infinite ({v.reshape(-1).tolist()})")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    metadata = adapter_metadata(adapter)
    metadata["checksum"] = checksum(v, metadata["tinylora"])
    save_file({"v": v}, path, metadata=metadata)
    os.chmod(path, 0o644)  # safetensors creates files 0600


def adapter_problems(path: str) -> list[str]:
    """What is wrong with an adapter file (empty when nothing is): unreadable, no checksum, a checksum that does
    not match, a non-finite v."""
    try:
        v, meta = read_adapter(path, verify=False)
    except (ValueError, FileNotFoundError, KeyError) as e:
        return [str(e)]
    problems = []
    if meta.get("checksum") is None:
        problems.append("no checksum (written before checksums; cannot verify)")
    elif meta["checksum"] != meta["computed_checksum"]:
        problems.append(f"checksum mismatch: its metadata or v was edited or damaged after it was written "
                        f"(stored {meta['checksum'][:16]}…, computed {meta['computed_checksum'][:16]}…)")
    if nonfinite(v):
        problems.append(f"{nonfinite(v)} of v's {v.numel()} values are NaN or infinite")
    return problems


def read_adapter(path: str, verify: bool = True) -> tuple[torch.Tensor, dict]:
    """Read ``(v (groups, u), metadata dict)`` from an adapter file, validating its format and, with ``verify``, its
    checksum (a file without one loads with a warning) and that v is finite. ``verify=False`` reads whatever is
    there (``tinylora-verl show``), with the stored and recomputed checksums in the metadata."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TinyLoRA adapter file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            v = f.get_tensor("v")
    except Exception as e:  # safetensors raises its own error types for a non-safetensors file
        raise ValueError(f"{path} is not a TinyLoRA adapter file (safetensors with a 'v' tensor): {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; this version reads {FORMAT!r}")
    info = json.loads(meta["tinylora"])
    info["config"] = {k: x for k, x in info["config"].items() if k in (*MEANING_FIELDS, "budget")}
    info["checksum"], info["computed_checksum"] = meta.get("checksum"), checksum(v, meta["tinylora"])
    if not verify:
        return v, info
    if info["checksum"] is None:
        warnings.warn(f"adapter {path} has no checksum (written before checksums): its metadata and v cannot be "
                      "verified", RuntimeWarning, stacklevel=2)
    elif info["checksum"] != info["computed_checksum"]:
        raise ValueError(f"adapter {path} fails its checksum: its metadata or v was edited or damaged after it was "
                         f"written (stored {info['checksum'][:16]}…, computed {info['computed_checksum'][:16]}…)")
    bad = nonfinite(v)
    if bad:
        raise ValueError(f"adapter {path} holds a non-finite v ({bad} of {v.numel()} values are NaN or infinite): "
                         "refused; resume from an earlier checkpoint")
    return v, info


def saved_config(meta: dict, v_dtype: torch.dtype = torch.float32, **runtime: Any) -> TinyLoRAConfig:
    """The :class:`TinyLoRAConfig` an adapter file describes (its meaning fields and budget, and the dtype of its
    saved v) with this machine's ``runtime`` settings (``cpu_kernel``, ``hook_dtype``; defaults otherwise)."""
    allowed = {"cpu_kernel", "hook_dtype"}
    unknown = sorted(set(runtime) - allowed)
    if unknown:
        raise ValueError(f"load_adapter: {unknown} are not runtime settings; allowed: {sorted(allowed)} (the rest of "
                         "the config comes from the file)")
    saved = {k: meta["config"][k] for k in (*MEANING_FIELDS, "budget") if k in meta["config"]}
    return TinyLoRAConfig(**saved, v_dtype=str(v_dtype).removeprefix("torch."), **runtime)


def load_adapter_state(adapter: SavedAdapter, path: str, check_fingerprint: bool = True) -> None:
    """Copy ``v`` from ``path`` into an existing adapter after checking it belongs to this model and plan.

    ``check_fingerprint=False`` is for ranks that never held the base weights (built on meta).
    """
    v, meta = read_adapter(path)
    saved, ours = meta["config"], adapter.config.to_dict()
    differ = [f"{k}: saved {saved.get(k)!r} vs {ours[k]!r}" for k in MEANING_FIELDS if saved.get(k) != ours[k]]
    if differ:
        raise ValueError(f"adapter {path} was saved with a different TinyLoRA config ({'; '.join(differ)})")
    names = adapter.tie_plan.module_names
    if len(names) != meta["num_modules"] or plan_hash(adapter.tie_plan.groups) != meta["plan_hash"]:
        raise ValueError(
            f"adapter {path} was trained on {meta['num_modules']} modules (plan {meta['plan_hash']}); this model "
            f"gives {len(names)} (plan {plan_hash(adapter.tie_plan.groups)}): a different architecture or target_modules"
        )
    kind = meta.get("fingerprint_kind", SAMPLED)
    ours_fp = adapter.fingerprint_of(kind) if check_fingerprint else None
    if check_fingerprint and ours_fp != meta["base_fingerprint"]:
        raise ValueError(
            f"adapter {path} was trained on a base whose target weights have fingerprint "
            f"{meta['base_fingerprint'][:16]}; this model's are {ours_fp[:16]} ({kind}): load it onto the same base "
            "model (any changed target weight changes the fingerprint)"
        )
    expected = (len(adapter.vectors), adapter.tie_plan.u)
    if tuple(v.shape) != expected:
        raise ValueError(f"adapter {path}: v has shape {tuple(v.shape)}, expected {expected} for this tie plan")
    with torch.no_grad():
        for p, row in zip(adapter.vectors, v):
            p.copy_(row.to(device=p.device, dtype=p.dtype))


def export_lora(adapter: SavedAdapter, path: str, dtype: torch.dtype = torch.float32) -> None:
    """Write the exact rank-r LoRA of the adapter as a peft adapter folder (``adapter_config.json`` + weights).

    ``lora_alpha = r`` makes peft's scaling ``alpha / r`` exactly 1, so ``B A = ΔW``.
    """
    os.makedirs(path, exist_ok=True)
    tensors = dict(adapter.lora_named_tensors(dtype))
    base = getattr(getattr(adapter.model, "config", None), "_name_or_path", None)
    cfg = {**adapter.lora_config(), "base_model_name_or_path": base}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
