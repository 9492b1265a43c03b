"""Run the benchmarks side by side and write a markdown report: ``python -m bench.run [--fast] [--out PATH]``.

Sections: adapter overhead (forward+backward vs the frozen base, ours vs peft TinyLoRA and LoRA), the overhead of
TinyLoRA alone in ABBA pairs against its own weights with the adapter off (the precise self ratio), injection time
(top_r_svd vs full_svd on SmolLM2 and on Qwen2.5-7B-shaped weights), merge fidelity (bf16/fp16/fp32 by |v|),
a profile of the hook when the overhead misses its goal, generation throughput of the merged, native and lora sync
modes at a fixed token count in vLLM CPU (``decode``), and end to end on CPU (``--e2e-run DIR``: TinyLoRA
with merged and lora sync beside verl's own LoRA r=8, phase by phase; ``make bench`` passes it) or from existing
verl metrics JSONLs (``--e2e-metrics``, ``--e2e-compare``). ``--fast`` shrinks every benchmark to a few minutes (one batch size, 3 timed rounds, one
7B-shaped layer extrapolated to 28).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from . import decode, e2e, fidelity, injection, overhead, overhead_ab, profiling
from .common import Section, log, machine_info, package_versions, steady_allocator

SECTIONS = ("overhead", "overhead-ab", "injection", "fidelity", "profile", "decode", "e2e")


def machine_load() -> tuple[float, int]:
    import os

    try:
        return os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return 0.0, os.cpu_count() or 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", action="store_true", help="small settings: minutes, not an hour")
    p.add_argument("--out", default="docs/benchmarks.md", help="markdown report path (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write every section's summary as JSON here")
    p.add_argument("--only", default=",".join(SECTIONS[:6]),
                   help=f"comma-separated sections among {','.join(SECTIONS)} (default: %(default)s; "
                        "e2e runs whenever --e2e-metrics is given)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--allocator", choices=("steady", "default"), default="steady",
                   help="steady: fix glibc malloc's thresholds first (bench.common.steady_allocator), so page faults "
                        "of fresh tensors do not depend on each process's history; default: leave glibc as it is")
    p.add_argument("--budget", type=int, default=13, help="TinyLoRA trainable scalars (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds for overhead (fast 3, full 21)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds for overhead (fast 1, full 2)")
    p.add_argument("--pairs", type=int, default=None, help="ABBA pairs for overhead-ab (fast 4, full 24)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (fast 1, full 1,2)")
    p.add_argument("--qwen-layers", type=int, default=None,
                   help="7B-shaped layers actually built, extrapolated to 28 (fast 1, full 3)")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help="profile the hook: auto = when TinyLoRA's overhead misses the 1.05x goal")
    p.add_argument("--decode-work", default="outputs/bench_decode",
                   help="decode: folder for the adapter's merged, LoRA and native forms (default: %(default)s)")
    p.add_argument("--decode-rounds", type=int, default=None,
                   help="decode: timed rounds per process (fast 1, full 3)")
    p.add_argument("--decode-passes", type=int, default=None,
                   help="decode: processes per mode, in mirrored passes (fast 1, full 4)")
    p.add_argument("--e2e-metrics", default=None, help="verl file-logger JSONL to summarize")
    p.add_argument("--e2e-compare", action="append", default=[], metavar="LABEL=JSONL",
                   help="verl metrics of runs to put side by side (repeat; the first is the reference)")
    p.add_argument("--e2e-run", default=None, metavar="DIR",
                   help="run TinyLoRA (merged and lora sync) and verl's LoRA r=8 on the CPU recipe into DIR, one "
                        "after another (runs already complete there are reused), and compare them")
    p.add_argument("--e2e-steps", type=int, default=3, help="GRPO steps per --e2e-run run (default: %(default)s)")
    p.add_argument("--e2e-floor-bytes", type=int, default=26, help="physical floor of one sync (13 bf16 = 26 B)")
    return p.parse_args(argv)


def smollm2_factory():
    from transformers import AutoModelForCausalLM

    from tinylora_verl.apps.models import prepare_smollm2

    path = str(prepare_smollm2())

    def factory(dtype: torch.dtype):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)

    return factory


def smollm2_modules(factory):
    """Target weights of SmolLM2 (bf16 as stored), one at a time, as ``(name, type, weight)``."""
    from tinylora_verl import find_target_modules
    from tinylora_verl.core.config import DEFAULT_TARGET_MODULES
    from tinylora_verl.core.tying import canonical_order

    def gen():
        mods = find_target_modules(factory(torch.bfloat16), DEFAULT_TARGET_MODULES)
        for name in canonical_order(list(mods), DEFAULT_TARGET_MODULES):
            yield name, name.rsplit(".", 1)[-1], mods[name].weight.detach()

    return gen


def timed_inject(factory, budget: int):
    from tinylora_verl import TinyLoRAConfig, inject_tinylora

    def go() -> float:
        model = factory(torch.bfloat16)
        t0 = time.perf_counter()
        inject_tinylora(model, TinyLoRAConfig(budget=budget))
        return time.perf_counter() - t0

    return go


def headline(sections: dict[str, Section]) -> list[str]:
    """One line per goal of the issue, read from the sections' summaries."""
    out = []
    ov = sections.get("overhead")
    if ov:
        for c in ov.summary["cases"]:
            r, sr, cr = c["paired_ratio"], c["self_ratio"], c["cpu_paired_ratio"]
            lo, hi = c["self_ratio_ci"][overhead.OURS]
            line = (f"overhead {c['dtype']} {c['batch']}x{c['seq_len']}: TinyLoRA {sr[overhead.OURS]:.3f}x "
                    f"[95% CI {lo:.3f}–{hi:.3f}] its weights with the adapter off (goal ≤ {ov.summary['goal']}: "
                    f"{'met' if c['ours_meets_goal'] else 'MISSED'}, "
                    f"{'whole interval within' if c['ours_meets_goal_ci'] else 'interval NOT within'}); "
                    f"across copies {r[overhead.OURS]:.3f}x base "
                    f"[min ratio {c['min_ratio'][overhead.OURS]:.3f}x, CPU time {cr[overhead.OURS]:.3f}x] "
                    f"(noise control: a second base copy {c['control']['paired_ratio']:.3f}x, "
                    f"min {c['control']['min_ratio']:.3f}x); peft TinyLoRA {sr[overhead.PEFT_TINY]:.3f}x / "
                    f"{r[overhead.PEFT_TINY]:.3f}x "
                    f"({'ours below' if c['ours_below_peft_tinylora'] else 'ours NOT below'})")
            if overhead.NO_KERNEL in sr:
                line += f", torch ops only (before) {sr[overhead.NO_KERNEL]:.3f}x / {r[overhead.NO_KERNEL]:.3f}x"
            if overhead.PER_MODULE in sr:
                line += f", a node per module (before) {sr[overhead.PER_MODULE]:.3f}x / {r[overhead.PER_MODULE]:.3f}x"
            if overhead.HOOK in sr:
                line += f", hook path (before) {sr[overhead.HOOK]:.3f}x / {r[overhead.HOOK]:.3f}x"
            if overhead.AUTOGRAD in sr:
                line += f", plain-autograd hook (before) {sr[overhead.AUTOGRAD]:.3f}x / {r[overhead.AUTOGRAD]:.3f}x"
            if overhead.OURS_ACT in sr:
                line += (f", hook_dtype=activation {sr[overhead.OURS_ACT]:.3f}x / {r[overhead.OURS_ACT]:.3f}x "
                         f"({'met' if c['ours_activation_meets_goal'] else 'MISSED'})")
            out.append(line)
    ab = sections.get("overhead-ab")
    if ab:
        for c in ab.summary["cases"]:
            out.append(f"overhead {c['dtype']} {c['batch']}x{c['seq_len']}, TinyLoRA alone in {ab.summary['pairs']} "
                       f"ABBA pairs: {c['ratio']:.3f}x [95% CI {c['ci'][0]:.3f}–{c['ci'][1]:.3f}] its weights with "
                       f"the adapter off (goal ≤ {ab.summary['goal']}: {'met' if c['meets_goal'] else 'MISSED'}, "
                       f"{'whole interval within' if c['meets_goal_ci'] else 'interval NOT within'})")
    inj = sections.get("injection")
    if inj:
        for label, s in inj.summary.items():
            if isinstance(s, dict):
                out.append(f"injection {label}: top_r_svd {s['speedup']:.1f}x faster than full_svd "
                           f"(goal ≥ {inj.summary['speedup_goal']:g}: {'met' if s['meets_speedup_goal'] else 'MISSED'})"
                           f", max ΔW rel {s['max_rel']:.2e} (goal ≤ {inj.summary['rel_goal']:g}: "
                           f"{'met' if s['meets_rel_goal'] else 'MISSED'}); the C++ gram_apply kernel "
                           f"{s['kernel_gain']:.2f}x over torch GEMMs; full fingerprint {s['fingerprint_s']:.2f} s "
                           f"({100 * s['fingerprint_share']:.1f}% of injection)"
                           + (f"; all {s['modules'] * s['scale']:.0f} targets {s['top_s']:.1f} s on "
                              f"{s['threads']} threads vs {s['top_1thread_s']:.1f} s on one (OMP_NUM_THREADS=1, "
                              f"as verl's actor ran it before): {s['thread_gain']:.2f}x" if "top_1thread_s" in s
                              else ""))
    fid = sections.get("fidelity")
    if fid:
        for c in fid.summary["cases"]:
            if c["pattern"] == "random-sign" and c["dtype"] == "bfloat16":
                out.append(f"bf16 merge, |v|={c['value']:g} random-sign: fidelity {c['fidelity']:.4f}, "
                           f"mean rel_error {c['mean_rel_error']:.3e}")
    dec = sections.get("decode")
    if dec:
        r = dec.summary["ratios"]
        out.append("generation at a fixed token count: " + ", ".join(f"{m} {x:.3f}x" for m, x in r.items())
                   + f" merged's tokens/s (native goal ≥ {dec.summary['goal']}: "
                   + f"{'met' if dec.summary['native_meets_goal'] else 'MISSED'})")
    e = sections.get("e2e")
    if e and "sync_bytes_over_floor" in e.summary:
        ratio = e.summary["sync_bytes_over_floor"]
        out.append(f"sync bytes / physical floor ({e.summary['floor_bytes']} B): ×{ratio:.3g}")
    return out


def render(sections: dict[str, Section], args: argparse.Namespace, command: str, info: dict, total: float) -> str:
    lines = ["# tinylora_verl benchmarks", "",
             f"Generated by `{command}` ({'fast' if args.fast else 'full'} mode) in {total / 60:.1f} min.", ""]
    heads = headline(sections)
    if heads:
        lines += ["## Headline", ""] + [f"- {h}" for h in heads] + [""]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()] + [""]
    for s in sections.values():
        lines.append(s.markdown())
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python -m bench.run" + ("" if not argv_list else " " + shlex.join(argv_list))
    if args.threads:
        torch.set_num_threads(args.threads)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--only: unknown sections {sorted(unknown)}; choose among {list(SECTIONS)}")
    if args.e2e_metrics or args.e2e_compare or args.e2e_run:
        only.add("e2e")
    if args.e2e_steps < 2:
        raise SystemExit(f"--e2e-steps must be >= 2 (the first step is warm-up and left out), got {args.e2e_steps}")
    compare_runs = {}
    for item in args.e2e_compare:
        label, sep, path = item.partition("=")
        if not sep or not label or not Path(path).is_file():
            raise SystemExit(f"--e2e-compare {item!r} must be LABEL=PATH of an existing verl metrics JSONL")
        compare_runs[label] = path
    fast = args.fast
    repeats = args.repeats or (3 if fast else 21)
    warmup = args.warmup if args.warmup is not None else (1 if fast else 2)
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else ((1,) if fast else (1, 2))
    # Full SVDs of 7B-shaped layers take ~100 s each here: 3 measured layers, extrapolated to 28, keep `make bench`
    # under an hour (every layer has the same shapes and spectrum model; --qwen-layers 28 measures them all).
    qwen_layers = args.qwen_layers or (1 if fast else 3)
    info = machine_info() | {f"{k} version": v for k, v in package_versions().items()}
    info["allocator"] = steady_allocator() if args.allocator == "steady" else "default (glibc's own tuning)"
    log(f"start ({'fast' if fast else 'full'} mode): {command}")
    load, cores = machine_load()
    if load > cores and torch.get_num_threads() > 1:
        log(f"WARNING: load average {load:.1f} > {cores} cores with {torch.get_num_threads()} torch threads: OpenMP "
            "barriers in MKL/LAPACK can then slow SVDs 10-100x (seen here: 0.18 s -> 17 s); numbers will be noisy. "
            "Run on a quiet machine, or pass --threads 1.")
    log("machine: " + "; ".join(f"{k}={v}" for k, v in info.items()))
    t0 = time.perf_counter()
    sections: dict[str, Section] = {}
    if "e2e" in only and args.e2e_run:
        # First, while this process is small: its models stay resident afterwards (the steady allocator never
        # trims), and beside them the verl runs' workers were OOM-killed by Ray (7.2 + 9.9 GB of 23 GB).
        compare_runs = {**e2e.run_recipes(args.e2e_run, steps=args.e2e_steps), **compare_runs}
    needs_model = only & {"overhead", "overhead-ab", "injection", "fidelity", "profile"}
    factory = smollm2_factory() if needs_model else None
    if "overhead" in only:
        sections["overhead"] = overhead.run(
            factory, batches=batches, seq_len=args.seq_len, repeats=repeats, warmup=warmup, budget=args.budget,
            full_ft=not fast, before=True)
    if "overhead-ab" in only:
        sections["overhead-ab"] = overhead_ab.run(factory, batches=batches, seq_len=args.seq_len,
                                                  pairs=args.pairs or (4 if fast else 24), warmup=warmup,
                                                  budget=args.budget)
    if "injection" in only:
        sections["injection"] = injection.run(
            real_modules=smollm2_modules(factory), synth_shapes=injection.QWEN7B_SHAPES,
            synth_layers=tuple(range(qwen_layers)), repeats=1 if fast else 3,
            inject=timed_inject(factory, args.budget))
    if "fidelity" in only:
        values = fidelity.VALUES if fast else (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
        sections["fidelity"] = fidelity.run(factory(torch.bfloat16), budget=args.budget, values=values,
                                            logprob_models=(factory(torch.float32), factory(torch.float32)))
    if "profile" in only and args.profile != "never":
        ov = sections.get("overhead")
        missed = [c["dtype"] for c in ov.summary["cases"] if not c["ours_meets_goal"]] if ov else []
        dtypes = [torch.float32, torch.bfloat16] if args.profile == "always" else \
            [getattr(torch, d) for d in dict.fromkeys(missed)]
        for dt in dtypes:
            sec = profiling.run(factory, dtype=dt, batch=1, seq_len=args.seq_len, budget=args.budget)
            sections[f"profile-{sec.summary['dtype']}"] = sec
        if not dtypes:
            log("profile: skipped (overhead goal met, or no overhead section; --profile always forces it)")
    if "decode" in only:
        from tinylora_verl.apps.models import prepare_smollm2

        sections["decode"] = decode.run(str(prepare_smollm2()), args.decode_work,
                                        rounds=args.decode_rounds or (1 if fast else 3),
                                        passes=args.decode_passes or (1 if fast else 4))
    if "e2e" in only:
        if not (args.e2e_metrics or compare_runs):
            log("e2e: skipped (no --e2e-run DIR, --e2e-metrics PATH or --e2e-compare LABEL=PATH)")
        if args.e2e_metrics:
            sections["e2e"] = e2e.run(args.e2e_metrics, floor_bytes=args.e2e_floor_bytes)
        if compare_runs:
            computed = {}
            if any(label in compare_runs for label in e2e.VERL_LORA_RANKS):
                from tinylora_verl.apps.models import prepare_smollm2

                computed = {label: {"tinylora/sync_bytes": float(e2e.lora_sync_bytes(prepare_smollm2(), rank))}
                            for label, rank in e2e.VERL_LORA_RANKS.items() if label in compare_runs}
            sections["e2e-compare"] = e2e.compare(compare_runs, floor_bytes=args.e2e_floor_bytes, computed=computed)
    total = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(sections, args, command, info, total))
    log(f"wrote {out} ({total / 60:.1f} min)")
    if args.json:
        Path(args.json).write_text(json.dumps({k: s.summary for k, s in sections.items()}, indent=1, default=str))
    for h in headline(sections):
        log(h)
    return 0


if __name__ == "__main__":
    sys.exit(main())
