"""Injection time: ``top_r_svd_batch`` (block Lanczos, float64 Rayleigh-Ritz) against ``full_svd`` (a full SVD).

Both factorizations are timed on every target weight (``top_r_svd_batch`` on all weights of one projection type
at once, as injection does) and compared through the ΔW they give,
``rel = ‖U₁Σ₁MV₁ᵀ − U₂Σ₂MV₂ᵀ‖_F / ‖U₂Σ₂MV₂ᵀ‖_F`` for one fixed random ``M`` (r x r, seeded), which is what
TinyLoRA's output depends on (signs are canonical in both). Results are aggregated per projection type.

Two sources of weights: a real model's target linears (SmolLM2-135M), and synthetic weights with the shapes of
Qwen2.5-7B built one module at a time (never all 196 at once: a 3584 x 18944 float32 weight is 271 MB).
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from types import SimpleNamespace

from tinylora_verl.core.fingerprint import fingerprint

from .common import Section, log, median

# Qwen2.5-7B: hidden 3584, intermediate 18944, 28 heads x 128, 4 KV heads, 28 layers.
QWEN7B_SHAPES = {
    "q_proj": (3584, 3584), "k_proj": (512, 3584), "v_proj": (512, 3584), "o_proj": (3584, 3584),
    "gate_proj": (18944, 3584), "up_proj": (18944, 3584), "down_proj": (3584, 18944),
}
QWEN7B_LAYERS = 28


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def synthetic_weight(shape: tuple[int, int], seed: int, k: int = 256, top=(4.0, 2.5, 1.6)) -> torch.Tensor:
    """A float32 weight with a real checkpoint's kind of spectrum: separated top values, a power law, a bulk.

    ``W = Q₁ diag(s) Q₂ᵀ + G`` with orthonormal ``Q₁`` (out, k), ``Q₂`` (in, k) from QR of seeded Gaussians,
    ``sᵢ = i^-0.5`` (the first ``len(top)`` multiplied by ``top``) and a Gaussian bulk ``G`` whose largest
    singular value is about ``0.5·s_k``: the top k singular values are ≈ s, the rest a Marchenko–Pastur bulk. An
    exact full-rank ``U diag(s) Vᵀ`` would need QR of a 18944 x 3584 matrix per module (as costly as the SVD
    being measured); what governs the Krylov iteration — the decay of the spectrum below ``σ_r`` — is the same.
    """
    out_f, in_f = shape
    k = min(k, out_f, in_f)
    gen = torch.Generator().manual_seed(seed)
    s = torch.arange(1, k + 1, dtype=torch.float32).pow(-0.5)  # (k,)
    s[: len(top)] *= torch.tensor(top[:k], dtype=torch.float32)
    Q1, _ = torch.linalg.qr(torch.randn(out_f, k, generator=gen))  # (out, k)
    Q2, _ = torch.linalg.qr(torch.randn(in_f, k, generator=gen))  # (in, k)
    bulk = 0.5 * s[-1].item() / (out_f**0.5 + in_f**0.5)
    W = torch.randn(out_f, in_f, generator=gen).mul_(bulk)  # (out, in)
    W.addmm_(Q1 * s, Q2.T)
    return W.mul_(0.02 / W.std().item())  # the scale of a typical checkpoint; ratios are scale-free


def synthetic_modules(shapes: dict[str, tuple[int, int]], layers: Iterable[int], seed: int = 0
                      ) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yield ``(name, type, weight)`` one module at a time, each from its own seeded generator."""
    for layer in layers:
        for typ, shape in shapes.items():
            block = "mlp" if typ in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            name = f"model.layers.{layer}.{block}.{typ}"
            yield name, typ, synthetic_weight(shape, _seed("bench-qwen7b", seed, name))


def compare_batch(weights: list[torch.Tensor], r: int, M: torch.Tensor, repeats: int = 1, ref64: bool = False
                  ) -> list[dict[str, float]]:
    """Time ``top_r_svd_batch`` on all of ``weights`` as one call (the batching ``inject_tinylora`` does; its
    median time is split evenly over the weights) and ``full_svd`` on each, and compare their ΔW.

    ``ref64`` adds both factorizations' ΔW error against a float64 full SVD: when σ_r ≈ σ_{r+1} the top-r
    singular vectors are ill-conditioned and even a float32 full SVD is off by ~1e-5..1e-4.
    """
    from tinylora_verl.core.factors import canonicalize_signs, dense_delta, full_svd, top_r_svd_batch

    # Each repeat times the batch and then every weight's full SVD, so both see the machine of the same minute: on
    # this shared 2-core VM the speed of a many-small-ops code like the Lanczos iteration drifts by tens of percent
    # over minutes, more than that of one big LAPACK call.
    t_top, t_gemm, t_full = [], [], [[] for _ in weights]
    for _ in range(repeats):
        t0 = time.perf_counter()
        tops = top_r_svd_batch(weights, r)
        t_top.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        top_r_svd_batch(weights, r, cpu_kernel="off")
        t_gemm.append(time.perf_counter() - t0)
        fulls = []
        for i, W in enumerate(weights):
            t0 = time.perf_counter()
            fulls.append(full_svd(W, r))
            t_full[i].append(time.perf_counter() - t0)
    per_weight, per_weight_gemm = median(t_top) / len(weights), median(t_gemm) / len(weights)
    results = []
    for W, (U1, S1, V1), (U2, S2, V2), times in zip(weights, tops, fulls, t_full):
        d1, d2 = dense_delta(U1, S1, V1, M), dense_delta(U2, S2, V2, M)  # (out, in) each
        out = {"top": per_weight, "top_gemm": per_weight_gemm, "full": median(times),
               "rel": ((d1 - d2).norm() / d2.norm()).item(),
               "s_rel": ((S1 - S2).abs() / S2).max().item()}
        if ref64:
            U, S, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
            U, V = canonicalize_signs(U[:, :r], Vh[:r].T)
            d = (U * S[:r]) @ M.double() @ V.T  # (out, in) float64
            out["top_vs64"] = ((d1.double() - d).norm() / d.norm()).item()
            out["full_vs64"] = ((d2.double() - d).norm() / d.norm()).item()
            out["gap"] = (S[r] / S[r - 1]).item()
        results.append(out)
    return results


def compare_module(W: torch.Tensor, r: int, M: torch.Tensor, repeats: int = 1, ref64: bool = False
                   ) -> dict[str, float]:
    """:func:`compare_batch` of one weight."""
    return compare_batch([W], r, M, repeats, ref64)[0]


def _by_type(modules: Iterable[tuple[str, str, torch.Tensor]]) -> list[tuple[list[str], str, list[torch.Tensor]]]:
    """``(names, type, weights)`` per projection type, in order of first appearance."""
    groups: dict[str, tuple[list[str], str, list[torch.Tensor]]] = {}
    for name, typ, W in modules:
        g = groups.setdefault(typ, ([], typ, []))
        g[0].append(name)
        g[2].append(W)
    return list(groups.values())


def _aggregate(per_module: list[tuple[str, str, dict]], scale: float, label: str, rows: list) -> dict:
    types = list(dict.fromkeys(t for _, t, _ in per_module))
    for typ in types + ["all"]:
        ms = [d for _, t, d in per_module if typ in ("all", t)]
        top, full = sum(d["top"] for d in ms), sum(d["full"] for d in ms)
        gemm = sum(d["top_gemm"] for d in ms)
        f64 = [max(d[k] for d in ms) if "top_vs64" in ms[0] else None for k in ("top_vs64", "full_vs64", "gap")]
        rows.append([label, typ, len(ms), top * scale, gemm * scale, gemm / top, full * scale, full / top,
                     max(d["rel"] for d in ms), max(d["s_rel"] for d in ms)] + f64)
    top = sum(d["top"] for _, _, d in per_module)
    fp = sum(d.get("fingerprint", 0.0) for _, _, d in per_module)
    one = [d["top_1thread"] for _, _, d in per_module if "top_1thread" in d]
    gemm = sum(d["top_gemm"] for _, _, d in per_module)
    full = sum(d["full"] for _, _, d in per_module)
    out = {"top_s": top * scale, "top_gemm_s": gemm * scale, "kernel_gain": gemm / top,
           "fingerprint_s": fp * scale, "fingerprint_share": fp / (top + fp),
           "threads": torch.get_num_threads(),
           "full_s": full * scale, "speedup": full / top,
           "max_rel": max(d["rel"] for _, _, d in per_module), "modules": len(per_module), "scale": scale}
    if one:
        out |= {"top_1thread_s": sum(one) * scale, "thread_gain": sum(one) / top}
    if "top_vs64" in per_module[0][2]:
        worst = max(per_module, key=lambda x: x[2]["rel"])
        out |= {"max_top_vs64": max(d["top_vs64"] for _, _, d in per_module),
                "max_full_vs64": max(d["full_vs64"] for _, _, d in per_module),
                "worst_module": worst[0], "worst_module_gap": worst[2]["gap"],
                "worst_module_top_vs64": worst[2]["top_vs64"], "worst_module_full_vs64": worst[2]["full_vs64"]}
    return out


def run(real_modules: Optional[Callable[[], Iterable[tuple[str, str, torch.Tensor]]]] = None,
        real_label: str = "SmolLM2-135M", synth_shapes: Optional[dict] = None, synth_layers: Sequence[int] = (0,),
        synth_total_layers: int = QWEN7B_LAYERS, synth_label: str = "Qwen2.5-7B-shaped", r: int = 2,
        repeats: int = 1, synth_repeats: int = 1, real_ref64: bool = True,
        inject: Optional[Callable[[], float]] = None, speedup_goal: float = 10.0,
        rel_goal: float = 1e-4, seed: int = 0, progress: Optional[Callable[[str], None]] = log) -> Section:
    """Compare the factorizations on ``real_modules()`` and on synthetic weights of ``synth_shapes``.

    ``synth_layers`` are the layers actually built; totals are extrapolated by
    ``synth_total_layers / len(synth_layers)`` (every layer has the same shapes and spectrum law).
    ``inject()`` optionally returns the wall time of one whole ``inject_tinylora`` call on the real model.
    """
    start = time.perf_counter()
    progress = progress or (lambda s: None)
    M = torch.randn(r, r, generator=torch.Generator().manual_seed(seed + 1))  # (r, r) fixed mixing matrix
    rows, summary, notes = [], {"speedup_goal": speedup_goal, "rel_goal": rel_goal}, []
    sources = []
    if real_modules is not None:
        sources.append((real_label, real_modules, 1.0, repeats, real_ref64, True))
    if synth_shapes:
        scale = synth_total_layers / len(synth_layers)
        sources.append((synth_label, lambda: synthetic_modules(synth_shapes, synth_layers, seed), scale,
                        synth_repeats, False, False))
        if scale != 1.0:
            n_meas = len(synth_layers) * len(synth_shapes)
            notes.append(f"{synth_label}: measured on layers {list(synth_layers)} ({n_meas} modules); seconds are extrapolated ×{scale:g} to {synth_total_layers} layers "
                         "(counts are of measured modules).")
    for label, modules, scale, reps, ref64, batched in sources:
        per_module = []
        groups = _by_type(modules()) if batched else (([n], t, [W]) for n, t, W in modules())
        for names, typ, Ws in groups:
            ds = compare_batch(Ws, r, M, reps, ref64)
            t0 = time.perf_counter()
            fingerprint({n: SimpleNamespace(weight=W) for n, W in zip(names, Ws)})
            for d in ds:  # split evenly, as the batch's SVD time is
                d["fingerprint"] = (time.perf_counter() - t0) / len(ds)
            if not batched:
                # As verl's actor ran it before: Ray starts actors with OMP_NUM_THREADS=1 (one thread for the SVDs).
                from tinylora_verl.core.factors import top_r_svd_batch

                t0 = time.perf_counter()
                top_r_svd_batch(Ws, r, threads=1)
                for d in ds:
                    d["top_1thread"] = (time.perf_counter() - t0) / len(ds)
            per_module += [(name, typ, d) for name, d in zip(names, ds)]
            top, full = sum(d["top"] for d in ds), sum(d["full"] for d in ds)
            gemm = sum(d["top_gemm"] for d in ds)
            progress(f"injection {label}: {names[0] if len(names) == 1 else typ} x{len(Ws)} {tuple(Ws[0].shape)} "
                     f"top_r {top:.3f}s (torch GEMMs {gemm:.3f}s) full {full:.3f}s x{full / top:.1f} "
                     f"rel {max(d['rel'] for d in ds):.1e}")
            del Ws
        s = _aggregate(per_module, scale, label, rows)
        s["meets_speedup_goal"] = s["speedup"] >= speedup_goal
        s["meets_rel_goal"] = s["max_rel"] <= rel_goal
        summary[label] = s
        if "worst_module" in s:
            notes.append(f"{label}: largest ΔW disagreement in `{s['worst_module']}` (σ_{r + 1}/σ_{r} = "
                         f"{s['worst_module_gap']:.4f}); against a float64 SVD, top_r_svd is off by "
                         f"{s['worst_module_top_vs64']:.2e} and float32 full_svd by {s['worst_module_full_vs64']:.2e}.")
    if inject is not None:
        summary["inject_tinylora_s"] = inject()
        notes.append(f"one whole `inject_tinylora(model, TinyLoRAConfig(budget=13))` on {real_label}: "
                     f"{summary['inject_tinylora_s']:.2f} s (SVDs, projections, fingerprint, hooks).")
    notes += [
        f"{real_label}: top_r_svd is timed as one `top_r_svd_batch` call per projection type, the batching "
        "`inject_tinylora` does (same-shape weights in batches of ≤ 8 MiB, one weight per intra-op thread; its "
        "time is split evenly over the type's modules), full_svd per module (`torch.linalg.svd`, torch's default "
        f"threads); medians of {repeats} run(s), each timing the batch and then its full SVDs. {synth_label}: each "
        f"weight exceeds a batch, so one call per module, {synth_repeats} run(s).",
        f"{synth_label}: `top_1thread_s` / `thread_gain` in the JSON (and the headline) time the same SVDs on one "
        "thread, as verl's actor ran them before (Ray gives actors OMP_NUM_THREADS=1); the engine now uses every core "
        "the actor may run on (and rank 0's GPU when it has one).",
        "fingerprint: the full sha256 of the weights' float32 values an adapter file carries (every target weight, "
        "in threads), timed on the same weights; `fingerprint_share` in the JSON is its part of injection time.",
        "speedup = Σ full_svd time / Σ top_r_svd time (goal ≥ "
        f"{speedup_goal:g}×); ΔW rel = max over modules of ‖ΔW_top − ΔW_full‖/‖ΔW_full‖ for a fixed seeded M "
        f"(goal ≤ {rel_goal:g}); σ rel = max relative error of the top-{r} singular values.",
        "vs f64 columns (real weights only): max ΔW error of each float32 factorization against a float64 full "
        f"SVD; gap = max σ_{r + 1}/σ_{r} (near 1: the top-{r} singular vectors are ill-conditioned in float32).",
        "top_r_svd: float32 block Lanczos (block 2) on the smaller side's Gram until the top-r Ritz residual is "
        "≤ 2e-6 σ₁², then a float64 Rayleigh-Ritz step on the top r + 6 Ritz vectors, which separates nearly equal "
        "σ_r ≈ σ_{r+1} that float32 round-off cannot (float64 full SVD only when min(out, in) ≤ 32). Its products "
        "with the Gram run on the C++ kernel `gram_apply` (tinylora_verl/kernels/csrc/gram_apply.cpp: one pass over a tall "
        "weight's rows, two over a wide one's); `top_r_svd, torch GEMMs` is the same call with `cpu_kernel='off'` "
        "(two batched GEMMs per step), timed in the same repeat, and kernel gain the ratio of the two.",
        "max ΔW rel compares against float32 full_svd, which is itself up to ~1e-4 off a float64 SVD on SmolLM2 "
        "(see the vs f64 columns): there the ΔW rel is full_svd's own error, not top_r_svd's.",
        f"{synth_label} weights: W = Q₁ diag(s) Q₂ᵀ + Gaussian bulk, s_i = i^-0.5 for i ≤ 256 with the top 3 "
        "boosted ×(4, 2.5, 1.6), bulk top edge ≈ s_256/2, float32, one seeded generator per module.",
    ]
    cols = ["weights", "type", "modules", "top_r_svd s", "top_r_svd, torch GEMMs s", "kernel gain", "full_svd s",
            "speedup", "max ΔW rel", "max σ rel", "top vs f64", "full vs f64", "gap"]
    return Section("injection", "Injection time: top_r_svd vs full_svd", cols, rows, notes, summary,
                   time.perf_counter() - start)
