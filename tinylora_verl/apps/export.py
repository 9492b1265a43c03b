"""Export a trained adapter: the merged HF model and/or the exact rank-r LoRA, from one load of the base.

    export(model_dir, adapter_path, merged_out=..., lora_out=..., dtype="bfloat16") -> Exported

The merged folder holds ``cast(W + ΔW)`` for every target weight, the sum formed in float32 from the pristine base
and cast once (:meth:`~tinylora_verl.core.adapter.TinyLoRAAdapter.merged_named_tensors`), every other tensor cast
to ``dtype``, in safetensors shards of at most ``shard_bytes`` (so peak memory is one float32 model plus one shard),
with the base's config, tokenizer and generation config; vLLM and transformers load it as any checkpoint. The LoRA
folder is a peft adapter with ``B = U Σ M``, ``A = Vᵀ`` and ``lora_alpha = r`` (``B A = ΔW`` exactly). The command
line (``tinylora-verl export``), the evaluation's merged and LoRA modes and the tests all use this function.

Each folder is written whole into a temporary sibling and renamed into place, so a folder never holds a mix of an
old export and a new one (a stale shard index beside new weights makes vLLM's loader refuse it). A non-empty
target folder is refused unless ``overwrite``; then it is replaced only once the new folder is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional


@dataclasses.dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote, and how much of ΔW a ``dtype`` merge keeps (``‖cast(W+ΔW) − cast(W)‖ / ‖ΔW‖``)."""

    merged: Optional[Path]
    lora: Optional[Path]
    fidelity: float
    r: int


@contextlib.contextmanager
def atomic_folder(target: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``target`` to write into, renamed to ``target`` when the block ends without error
    (a non-empty ``target`` is refused unless ``overwrite``; it is replaced only then)."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass --overwrite (overwrite=True) to replace it, or "
                              "choose another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def export(model_dir: str, adapter_path: str, merged_out: Optional[str] = None, lora_out: Optional[str] = None,
           dtype: str = "bfloat16", shard_bytes: int = 2 << 30, progress: bool = True,
           overwrite: bool = False, zero_v: bool = False) -> Exported:
    """Load ``model_dir`` in float32 with the adapter at ``adapter_path`` and write what is asked (neither: just
    the merge fidelity). Refuses non-empty output folders unless ``overwrite`` (checked before any loading).
    ``zero_v``: the same adapter with v = 0 (ΔW = 0), written through the same path: the evaluation's control of
    what the serving path alone changes."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..core.adapter import load_adapter

    for out in (merged_out, lora_out):
        if out is not None and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())) \
                and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite (overwrite=True) to replace it, "
                                  "or choose another folder")
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapter = load_adapter(adapter_path, model)
    if zero_v:
        with torch.no_grad():
            for v in adapter.parameters():
                v.zero_()
    try:
        fidelity, _ = adapter.merge_fidelity(torch_dtype)
        if not math.isfinite(fidelity):
            raise ValueError(f"the merge of {adapter_path} is not finite (fidelity {fidelity}); nothing written")
        lora = None
        if lora_out is not None:
            with atomic_folder(Path(lora_out), overwrite) as tmp:
                adapter.export_lora(str(tmp))
            lora = Path(lora_out)
        merged = None
        if merged_out is not None:
            with atomic_folder(Path(merged_out), overwrite) as tmp:
                _write_merged(model, adapter, model_dir, tmp, torch_dtype, shard_bytes, progress)
            merged = Path(merged_out)
        return Exported(merged, lora, fidelity, adapter.config.r)
    finally:
        adapter.remove()


def _write_merged(model, adapter, model_dir: str, out: Path, torch_dtype, shard_bytes: int, progress: bool) -> Path:
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    # Tied embeddings share storage; loaders tie lm_head themselves, so only the embedding is written.
    skip = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    shards, current, size = [], {}, 0
    state = model.state_dict()
    for name, tensor in tqdm(adapter.merged_named_tensors(state.items(), dtype=torch_dtype), total=len(state),
                             desc="merge", disable=not progress):
        if name in skip:
            continue
        current[name] = tensor.contiguous()
        size += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.dtype = torch_dtype
    model.config.save_pretrained(str(out))
    try:
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(str(out))
    except (OSError, ValueError):  # a bare weights folder (no tokenizer files): the merged model has none either
        pass
    gen_cfg = Path(model_dir) / "generation_config.json"
    if gen_cfg.is_file():  # vLLM reads default sampling settings from it; keep them identical to the base's
        shutil.copy(gen_cfg, out / "generation_config.json")
    return out


__all__ = ["Exported", "export"]
