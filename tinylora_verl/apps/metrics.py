"""verl's file-logger metrics: the one reader every app (demo, plots, sweep, study) and the benchmarks use.

verl's ``trainer.logger=[..., file]`` writes ``$VERL_FILE_LOGGER_PATH``, one JSON object ``{"step": N, "data":
{metric: value}}`` per line. :func:`read_metrics` returns those rows as ``{"step": N, **data}`` in file order.
A line that is not such an object (the half-written last line of a running job, a truncated file, a stray print)
is skipped and counted in :attr:`Metrics.malformed`, never raised: a partly written log still shows what it has.
Worker metrics carry their role as a prefix (``actor/tinylora/v_0``); :func:`series` can drop it.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

_V_KEY = re.compile(r"(^|/)tinylora/v_(\d+)$")


class Metrics(list):
    """The rows of a metrics file (``{"step": N, **data}``), with the number of lines skipped as malformed."""

    malformed: int = 0


def read_metrics(path: str | os.PathLike) -> Metrics:
    """The rows of a verl file-logger JSONL; an absent file has none."""
    rows = Metrics()
    path = Path(path)
    if not path.is_file():
        return rows
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                rows.malformed += 1
                continue
            step = row.get("step") if isinstance(row, dict) else None
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not isinstance(row.get("data"), dict):
                rows.malformed += 1
                continue
            rows.append({"step": int(step), **row["data"]})
    return rows


def series(rows: Iterable[dict], keys: Optional[Sequence[str]] = None, strip_prefix: str = "",
           patterns: Sequence[str] = ()) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` of finite numbers, in row order. ``strip_prefix`` is dropped from keys
    first; then only ``keys`` and keys matching one of the regular expressions ``patterns`` are kept (all keys when
    neither is given)."""
    compiled = [re.compile(p) for p in patterns]
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            key = key.removeprefix(strip_prefix) if strip_prefix else key
            if (keys is None and not compiled) or (keys is not None and key in keys) or any(
                    p.search(key) for p in compiled):
                out.setdefault(key, []).append((row["step"], float(value)))
    return out


def _flat(value) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in _flat(item)]
    return [float(value)]


def append_launch(launch: str | os.PathLike, metrics_path: str | os.PathLike) -> None:
    """Move one launch's metrics file onto the run's ``metrics.jsonl``: verl's file logger truncates its file at each
    launch, so a resumed run gives each launch a file of its own."""
    launch = Path(launch)
    if launch.is_file():
        with open(metrics_path, "a") as fh:
            fh.write(launch.read_text())
        launch.unlink()


def scalar(value) -> float:
    """A logged metric as one number: verl's SFT trainer logs the engine's per-step metrics unreduced, as nested
    lists of each data-parallel rank's value (identical for v), where ``main_ppo`` logs their mean."""
    values = _flat(value)
    return sum(values) / len(values)


def v_values(row: dict) -> list[float]:
    """The step's v values (``[actor/]tinylora/v_<i>``), in index order."""
    items = sorted((int(m.group(2)), v) for k, v in row.items() if (m := _V_KEY.search(k)))
    return [scalar(v) for _, v in items]


def first_and_last(path: str | os.PathLike, metric: str) -> tuple[Optional[float], Optional[float]]:
    """``(step-0 value, last value)`` of ``metric`` (None where it was not logged)."""
    rows = [r for r in read_metrics(path) if metric in r]
    first = next((float(r[metric]) for r in rows if r["step"] == 0), None)
    return first, (float(rows[-1][metric]) if rows else None)


def find_metrics_file(source: str | os.PathLike) -> Path:
    """``source`` itself if a file, else the newest verl file-logger JSONL under the folder ``source``."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"metrics source {str(path)!r} is neither a JSONL file nor a folder")
    candidates = sorted(path.rglob("*.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True)
    for c in candidates:
        with c.open(encoding="utf-8", errors="replace") as f:
            first = f.readline()
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row and isinstance(row.get("data"), dict):
            return c
    raise FileNotFoundError(f"no verl file-logger JSONL (lines like {{\"step\": N, \"data\": {{...}}}}) under "
                            f"{str(path)!r}; looked at {len(candidates)} .jsonl files")


__all__ = ["Metrics", "find_metrics_file", "first_and_last", "read_metrics", "series", "v_values"]
