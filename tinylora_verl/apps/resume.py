"""Resume from the newest intact checkpoint, never from a damaged one and never from scratch without saying so.

verl resumes from ``<run>/latest_checkpointed_iteration.txt`` (``trainer.resume_mode: auto``) or from
``trainer.resume_from_path`` (``resume_path``). On the driver, before Ray starts, :func:`check_resume` looks at
that checkpoint's adapter file (:func:`tinylora_verl.core.adapter_io.adapter_problems`: unreadable, a checksum that
does not match, a non-finite v) and its per-rank state files. If it is damaged:

- with ``tinylora.strict_resume: true``, or with an explicit ``resume_from_path``, the run stops with the reason;
- otherwise the damaged ``global_step_N`` folder is renamed ``global_step_N.damaged`` (kept for inspection),
  the tracker is rewritten to the newest intact step before it, and the run resumes there, saying so;
- with no intact checkpoint left, the run stops rather than start from scratch silently.

A run folder the driver cannot see (a cluster without shared storage) is left to the workers, which refuse a
damaged file with the same message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from ..core.adapter_io import adapter_problems
from ..verl.checkpoints import ADAPTER_FILE, STATE_FILE, STEP_DIR, TRACKER_FILE


class ResumeError(ValueError):
    """The checkpoint verl would resume from is damaged and the run may not fall back."""


def checkpoint_problems(step_dir: Path) -> list[str]:
    """What is wrong with one ``global_step_N`` folder's actor checkpoint (empty when intact)."""
    actor = step_dir / "actor"
    adapter = actor / ADAPTER_FILE
    if not adapter.is_file():
        return [f"{adapter} is missing"]
    problems = [p for p in adapter_problems(str(adapter)) if not p.startswith("no checksum")]
    if not (actor / STATE_FILE.format(rank=0)).is_file():
        problems.append(f"{actor / STATE_FILE.format(rank=0)} is missing")
    return problems


def steps(run: Path) -> list[int]:
    """The checkpointed steps under ``run``, oldest first."""
    found = [int(m.group(1)) for p in run.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def check_resume(cfg: Mapping[str, Any], options: Any) -> list[str]:
    """Inspect the checkpoint verl would resume from; fall back, stop, or do nothing (see the module docstring).
    Returns notes for the driver's log."""
    trainer = cfg.get("trainer", {})
    mode = trainer.get("resume_mode", "auto")
    if mode == "disable":
        return []
    if mode == "resume_path":
        path = trainer.get("resume_from_path")
        if path and Path(path).is_dir():
            problems = checkpoint_problems(Path(path))
            if problems:
                raise ResumeError(f"trainer.resume_from_path={path} is damaged: {'; '.join(problems)}")
        return []
    run = Path(str(trainer.get("default_local_dir", ""))).expanduser()
    tracker = run / TRACKER_FILE
    if not tracker.is_file():
        return []
    latest = int(tracker.read_text().strip())
    problems = checkpoint_problems(run / f"global_step_{latest}")
    if not problems:
        return []
    why = f"the checkpoint verl would resume from, {run / f'global_step_{latest}'}, is damaged: {'; '.join(problems)}"
    if getattr(options, "strict_resume", False):
        raise ResumeError(f"{why}; tinylora.strict_resume=true, so the run stops")
    intact = _newest_intact(run, below=latest)
    if intact is None:
        raise ResumeError(f"{why}, and no earlier intact checkpoint exists under {run}; the run stops rather than "
                          "start from scratch (move the folder away, or set trainer.resume_mode=disable)")
    damaged = run / f"global_step_{latest}"
    os.replace(damaged, _free_name(damaged))
    tracker.write_text(str(intact))
    return [f"{why}; it was renamed {_free_name(damaged, exists=True).name} and the run resumes from step {intact}"]


def _newest_intact(run: Path, below: int) -> Optional[int]:
    for step in reversed([s for s in steps(run) if s < below]):
        if not checkpoint_problems(run / f"global_step_{step}"):
            return step
    return None


def _free_name(path: Path, exists: bool = False) -> Path:
    """``<path>.damaged``, or ``.damaged.2`` and so on when taken; with ``exists``, the newest one taken."""
    candidates = [path.with_name(f"{path.name}.damaged")] + [path.with_name(f"{path.name}.damaged.{i}")
                                                               for i in range(2, 1000)]
    taken = [c for c in candidates if c.exists()]
    if exists:
        return taken[-1]
    return next(c for c in candidates if not c.exists())


__all__ = ["ResumeError", "check_resume", "checkpoint_problems", "steps"]
