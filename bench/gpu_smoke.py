"""GPU smoke: TinyLoRA's verl engine on one CUDA GPU, in one process, without vLLM or Ray.

    python -m bench.gpu_smoke [--markdown docs/gpu.md] [--json smoke.json]
    python -m bench.gpu_smoke --cpu      # the same checks on the CPU, as CI runs them

Builds ``TinyLoRAFSDPEngine`` through verl's ``EngineRegistry`` as verl's ``TrainingWorker`` does, on a bf16 Qwen2
with seeded random weights, at a small shape and at Qwen2.5-7B's layer shapes (two decoder layers), with
remove-padding (flash-attn when importable, else SDPA), gradient checkpointing and one train step, and checks:

- v is float32 on the engine's device and a plain tensor (not an FSDP DTensor);
- the fused linear under bf16 autocast against a float64 dense ``x (W + ΔW)ᵀ + b``: no further from it than twice
  the bf16 base linear is from its own float64 value, plus one bf16 rounding of the output;
- v's gradient against autograd through the dense ``ΔW(v)`` in float64 (float32 inputs, rtol 1e-3);
- packed (remove-padding) log-probs against padded ones through verl's ``infer_batch`` (atol 0.1 in bf16), and
  more than twice as far from them when the same tokens run as one sequence (the control);
- the merged stream: every HF name once, contiguous bf16 tensors on the device, target weights ``cast(W + ΔW)``;
- one train step moves v and keeps it finite.

It prints the injection time, step time, peak memory and the adapter's forward+backward time over the same model
with the adapter off (self ratio) at 4096 tokens. ``--cpu`` runs 128 tokens over a 4096-word vocabulary, in bf16
only where the CPU has native bf16 matrix instructions (float32 elsewhere: a bf16 GEMM there is ~200x slower).
On a GPU it needs torch and transformers, plus verl and its light dependencies (``bench/gpu_wheels.sh`` downloads
them); a stand-in ``ray`` module is installed when Ray is absent (verl imports it at import time; nothing on this
path calls it). ``--cpu`` also activates tinylora_verl's CPU platform, which needs vLLM's CPU build (CI's stack).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from .smoke_checks import (ShapeReport, build_engine, check_fused_op, check_merged_stream, check_packing,
                           check_v, check_v_gradient, init_process_group, install_ray_stub, overhead_ratio,
                           save_random_qwen2, train_step)

# Decoder-layer shapes: a small Qwen2, and Qwen2.5-7B's (hidden 3584, MLP 18944, 28 heads of 128, 4 KV heads).
SHAPES = {
    "small": dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2),
    "qwen2.5-7b-layers": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                              num_key_value_heads=4),
}
# Tokens per train step and vocabulary: the GPU runs the real Qwen2.5 vocabulary at 4k tokens; two CPU cores would
# take many minutes for that, so --cpu keeps the layer shapes and shrinks both.
GPU_PRESET = {"tokens": 4096, "vocab_size": 152064}
CPU_PRESET = {"tokens": 128, "vocab_size": 4096}


def run(device: str, shapes: Sequence[str], tokens: Optional[int], work: Path, progress=print) -> dict:
    """Run every check on each shape; return the report (raises AssertionError on the first failed check)."""
    import torch

    from tinylora_verl.verl.cpu.precision import cpu_dtype

    preset = GPU_PRESET if device == "cuda" else CPU_PRESET
    tokens = tokens or preset["tokens"]
    # bf16 on the GPU; on a CPU only where it has native bf16 matrix instructions (else ~200x slower GEMMs).
    dtype = torch.bfloat16 if device == "cuda" else getattr(torch, cpu_dtype())
    reports = []
    for name in shapes:
        start = time.perf_counter()
        model_dir = save_random_qwen2(work / name, dict(SHAPES[name], vocab_size=preset["vocab_size"]), seed=0,
                                      dtype=dtype)
        engine, attn, inject_s = build_engine(model_dir, device, dtype)
        progress(f"[{name}] engine built ({attn}, {dtype}); factors in {inject_s:.2f} s")
        report = ShapeReport(name=name, attention=attn, dtype=str(dtype).removeprefix("torch."), tokens=tokens,
                             inject_s=inject_s)
        check_v(engine, device)
        report.checks.append("v: float32, on the device, not a DTensor")
        report.fused_err, report.base_err = check_fused_op(engine, device, dtype)
        report.checks.append(f"fused op vs float64: {report.fused_err:.3g} (base linear: {report.base_err:.3g})")
        report.grad_rel = check_v_gradient(engine, device)
        report.checks.append(f"dL/dv vs float64 autograd: rel {report.grad_rel:.2e}")
        report.packing_diff, report.mixing_diff = check_packing(engine, tokens, dtype)
        report.checks.append(f"packed vs padded log-probs: max |Δ| {report.packing_diff:.2e} (sequences run as "
                             f"one: {report.mixing_diff:.2e})")
        report.stream_tensors = check_merged_stream(engine, model_dir, device)
        report.checks.append(f"merged stream: {report.stream_tensors} tensors, bf16, contiguous, HF names")
        report.step_s, report.peak_gb, report.v_moved = train_step(engine, tokens, device)
        report.checks.append(f"train step: v moved by {report.v_moved:.2e}")
        report.overhead, report.overhead_ci = overhead_ratio(engine, tokens, device)
        report.seconds = time.perf_counter() - start
        progress(f"[{name}] " + "; ".join(report.checks))
        progress(f"[{name}] step {report.step_s:.2f} s, peak {report.peak_gb:.2f} GB, adapter fwd+bwd self ratio "
                 f"{report.overhead:.3f} [{report.overhead_ci[0]:.3f}, {report.overhead_ci[1]:.3f}]")
        reports.append(report)
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()
    return machine(device) | {"shapes": [r.as_dict() for r in reports]}


def machine(device: str) -> dict:
    import platform

    import torch
    import transformers

    info = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    if device == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    try:
        import verl

        info["verl"] = verl.__version__
    except Exception:  # a report without verl is still a report
        pass
    return info


def markdown(report: dict) -> str:
    lines = ["# GPU smoke", "", "Written by `python -m bench.gpu_smoke --markdown docs/gpu.md` (bench/gpu_smoke.py).",
             "", "| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report.items() if k != "shapes"]
    lines += ["", "| shape | attention | dtype | tokens | factors s | step s | peak GB | self ratio [95% CI] | "
              "fused err (base) | dL/dv rel | packed Δ |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in report["shapes"]:
        lines.append(f"| {s['name']} | {s['attention']} | {s['dtype']} | {s['tokens']} | {s['inject_s']:.2f} | "
                     f"{s['step_s']:.2f} | "
                     f"{s['peak_gb']:.2f} | {s['overhead']:.3f} "
                     f"[{s['overhead_ci'][0]:.3f}–{s['overhead_ci'][1]:.3f}] | "
                     f"{s['fused_err']:.3g} ({s['base_err']:.3g}) | {s['grad_rel']:.2e} | {s['packing_diff']:.2e} |")
    lines += ["", "Checks passed:", ""] + [f"- {s['name']}: {c}" for s in report["shapes"] for c in s["checks"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_smoke", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="Run on the CPU (CPU platform, gloo) instead of CUDA.")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"Comma-separated, from {list(SHAPES)}.")
    p.add_argument("--tokens", type=int, default=None, help="Tokens per train step (default: 4096 GPU, 256 CPU).")
    p.add_argument("--stub-ray", action="store_true", help="Use the stand-in ray module even if Ray is installed.")
    p.add_argument("--json", default=None, help="Write the report as JSON here.")
    p.add_argument("--markdown", default=None, help="Write the report as Markdown here (docs/gpu.md).")
    args = p.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        p.error(f"--shapes {args.shapes!r}: unknown {unknown}; allowed: {list(SHAPES)}")
    if args.tokens is not None and args.tokens < 64:
        p.error(f"--tokens must be >= 64, got {args.tokens}")
    install_ray_stub(force=args.stub_ray)
    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here; run with --cpu for the CPU variant")
    init_process_group(device)
    with tempfile.TemporaryDirectory(prefix="tinylora_gpu_smoke_") as work:
        report = run(device, shapes, args.tokens, Path(work))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
