"""Shared pieces of the benchmarks: the report section type, markdown rendering, machine info, timing, logging."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import random
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch


@dataclasses.dataclass
class Section:
    """One benchmark's report: a markdown table (``columns`` x ``rows``), free-text ``notes`` and a ``summary``.

    ``summary`` holds the headline numbers (ratios, goals met) as plain JSON-able values, so tests and other
    tools can read a result without parsing markdown.
    """

    key: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: list[str] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        if self.rows:
            out.append("| " + " | ".join(_esc(c) for c in self.columns) + " |")
            out.append("|" + "|".join("---" for _ in self.columns) + "|")
            for row in self.rows:
                out.append("| " + " | ".join(_esc(fmt(c)) for c in row) + " |")
            out.append("")
        out.extend(f"- {n}" for n in self.notes)
        out.append(f"- section wall time: {self.seconds:.1f} s")
        out.append("")
        return "\n".join(out)


def _esc(cell: str) -> str:
    """A pipe inside a cell (e.g. ``|v|``) would end it."""
    return cell.replace("|", "\\|")


def fmt(x: Any) -> str:
    """Format a table cell: floats with 4 significant digits (scientific when tiny or huge), the rest as str."""
    if isinstance(x, bool) or x is None:
        return "—" if x is None else ("yes" if x else "no")
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x == 0.0:
            return "0"
        if abs(x) < 1e-3 or abs(x) >= 1e6:
            return f"{x:.3e}"
        return f"{x:.4g}"
    return str(x)


def log(msg: str) -> None:
    """A progress line on stderr, prefixed with the wall-clock time."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The bf16/AVX-512 flags that decide CPU bf16 GEMM speed."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in have]
    except OSError:
        pass
    return []


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's cap on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def steady_allocator() -> str:
    """Fix glibc malloc's thresholds for the rest of the process and say what was set.

    By default glibc tunes its mmap threshold as blocks are freed and returns the heap's top to the kernel past a
    trim threshold, so whether a fresh activation-sized tensor costs page faults (~0.3 ms per MB here) depends on
    the process's allocation history: the same base model measured 91-104 ms a step for its first 4 layers in
    different processes, 88-91 ms with these settings. Blocks up to 32 MiB come from the heap, which is never
    trimmed, so freed blocks are mostly reused (not always: glibc cannot fit a 64-byte aligned request into a
    freed block of the same size that did not merge with the heap's top); every variant of a run gets the same
    allocator.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        ok = libc is not None and all(libc.mallopt(p, v) == 1 for p, v in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 * 2**20)))
    except (OSError, AttributeError):
        ok = False
    if not ok:
        return "default (mallopt unavailable)"
    return "glibc, fixed: mmap threshold 32 MiB, no trimming, top pad 64 MiB (bench.common.steady_allocator)"


def git_commit(repo: Optional[str] = None) -> str:
    """The checkout's short commit, with ``+ uncommitted changes`` when tracked files differ from it (a report
    then says what code it measured); ``unknown`` outside a git checkout."""
    import subprocess

    cwd = repo or os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} + uncommitted changes" if dirty else head


def machine_info() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": git_commit(),
        "cpu": cpu_model(),
        "cpu flags": " ".join(cpu_flags()) or "—",
        "logical cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load average (1/5/15 min) at start": " / ".join(f"{x:.2f}" for x in load),
    }


def package_versions(names: Sequence[str] = ("transformers", "peft")) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = "not installed"
    return out


def timed_call(fn: Callable[[], None], after: Optional[Callable[[], None]] = None) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of ``fn()``; ``after()`` runs untimed once it returns."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    if after is not None:
        after()
    return dt, dc


def interleaved_times(
    fns: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int,
    after: Optional[Callable[[str], None]] = None,
    progress: Optional[Callable[[str], None]] = None,
    cpu: Optional[dict[str, list[float]]] = None,
    adjacent: Optional[dict[str, str]] = None,
) -> dict[str, list[float]]:
    """Time every ``fns[k]()`` ``repeats`` times after ``warmup`` rounds, interleaved round-robin.

    Each round runs every variant once, in an order rotated by one per round, so slow drifts of the machine's
    load hit all variants alike and per-round ratios pair measurements taken seconds apart. ``adjacent`` maps a
    name to a partner that always runs right beside it, first in even rounds and second in odd ones: their
    per-round ratio then compares two calls a step apart, and a drift within the pair favours neither side.
    ``after(k)`` runs untimed after each call (e.g. to drop gradients). ``cpu``, if given, is filled with the
    process CPU time of each call: on a loaded machine it counts the work done rather than the time spent
    descheduled.
    """
    adjacent = adjacent or {}
    for k, partner in adjacent.items():
        if k not in fns or partner not in fns or partner == k or partner in adjacent:
            raise ValueError(f"adjacent: {k!r} -> {partner!r} must pair two different timed names, each in one "
                             f"pair only; timed names are {sorted(fns)}")
    partners = set(adjacent.values())
    units = [[k] + ([adjacent[k]] if k in adjacent else []) for k in fns if k not in partners]
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for rnd in range(warmup + repeats):
        shift = rnd % len(units)
        order = [k for unit in units[shift:] + units[:shift] for k in (unit if rnd % 2 == 0 else unit[::-1])]
        for k in order:
            dt, dc = timed_call(fns[k], None if after is None else lambda: after(k))
            if rnd >= warmup:
                times[k].append(dt)
                if cpu is not None:
                    cpu.setdefault(k, []).append(dc)
        if progress is not None:
            tag = "warmup" if rnd < warmup else f"round {rnd - warmup + 1}/{repeats}"
            done = ", ".join(f"{k} {times[k][-1]:.3f}s" for k in names if rnd >= warmup)
            progress(f"{tag} {done}".rstrip())
    return times


def bootstrap_ci(xs: Sequence[float], level: float = 0.95, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``xs``: ``draws`` resamples with replacement from a
    ``random.Random(seed)``, so a report's interval is reproducible from its numbers."""
    if not xs:
        raise ValueError("bootstrap_ci: no samples")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    if draws < 1:
        raise ValueError(f"bootstrap_ci: draws must be >= 1, got {draws}")
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(draws))
    tail = (1.0 - level) / 2.0
    return meds[int(tail * (draws - 1))], meds[int(round((1.0 - tail) * (draws - 1)))]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def paired_ratios(times: dict[str, list[float]], ref: str) -> dict[str, tuple[float, float, float]]:
    """Per-round ratios ``t_k / t_ref``: ``(median, min, max)`` for every variant."""
    out = {}
    for k, ts in times.items():
        rs = [a / b for a, b in zip(ts, times[ref])]
        out[k] = (median(rs), min(rs), max(rs)) if rs else (float("nan"),) * 3
    return out
