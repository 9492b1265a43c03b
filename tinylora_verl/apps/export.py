"""Export a trained adapter: the merged HF model and/or the exact rank-r LoRA, from one load of the base.

    export(model_dir, adapter_path, merged_out=..., lora_out=..., dtype="bfloat16") -> Exported

The merged folder holds ``cast(W + ΔW)`` for every target weight, the sum formed in float32 from the pristine base
and cast once (:meth:`~tinylora_verl.core.adapter.TinyLoRAAdapter.merged_named_tensors`), every other tensor cast
to ``dtype``, in safetensors shards of at most ``shard_bytes`` (so peak memory is one float32 model plus one shard),
with the base's config, tokenizer and generation config; vLLM and transformers load it as any checkpoint. The LoRA
folder is a peft adapter with ``B = U Σ M``, ``A = Vᵀ`` and ``lora_alpha = r`` (``B A = ΔW`` exactly). The command
line (``tinylora-verl export``), the evaluation's merged and LoRA modes and the tests all use this function.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote, and how much of ΔW a ``dtype`` merge keeps (``‖cast(W+ΔW) − cast(W)‖ / ‖ΔW‖``)."""

    merged: Optional[Path]
    lora: Optional[Path]
    fidelity: float
    r: int


def export(model_dir: str, adapter_path: str, merged_out: Optional[str] = None, lora_out: Optional[str] = None,
           dtype: str = "bfloat16", shard_bytes: int = 2 << 30, progress: bool = True) -> Exported:
    """Load ``model_dir`` in float32 with the adapter at ``adapter_path`` and write what is asked (neither: just
    the merge fidelity)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..core.adapter import load_adapter

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapter = load_adapter(adapter_path, model)
    try:
        fidelity, _ = adapter.merge_fidelity(torch_dtype)
        lora = None
        if lora_out is not None:
            adapter.export_lora(str(lora_out))
            lora = Path(lora_out)
        merged = None
        if merged_out is not None:
            merged = _write_merged(model, adapter, model_dir, Path(merged_out), torch_dtype, shard_bytes, progress)
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
