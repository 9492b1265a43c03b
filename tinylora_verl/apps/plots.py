"""Training curves of a verl run from its file-logger JSONL, drawn into one PNG.

Contract: ``plot_metrics(source, out=None) -> Path``. ``source`` is the JSONL that verl's ``trainer.logger=[...,
file]`` writes (``$VERL_FILE_LOGGER_PATH``; one line ``{"step": N, "data": {metric: value}}`` per step) or a folder
holding one (the newest ``*.jsonl`` whose first line has that shape). The PNG (default: the JSONL's path with
``.png``) has four panels; each draws whichever of its keys the log has and says so when it has none:

* reward: ``critic/score/mean``, ``critic/rewards/mean`` and validation ``val-*/.../reward/mean@*``;
* accuracy: any ``acc``/``accuracy`` metric (e.g. ``val-core/openai/gsm8k/acc/mean@1``);
* v: ``tinylora/v_0``, ``tinylora/v_1``, ... and ``tinylora/v_norm`` (dashed);
* rollout/trainer mismatch: ``rollout_corr/kl``, ``training/rollout_probs_diff_mean`` and ``..._max``.

Non-numeric values and lines that are not valid JSON (e.g. the half-written last line of a running job) are
skipped; a file without a single usable line is an error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .metrics import find_metrics_file, read_metrics, series

PANELS = (
    ("reward", (r"^critic/score/mean$", r"^critic/rewards/mean$", r"^val-[^/]+/.*reward/mean@\d+$")),
    ("accuracy", (r"(^|/)acc(uracy)?(/|$)",)),
    # verl prefixes the actor worker's metrics with "actor/".
    ("v", (r"(^|/)tinylora/v_\d+$", r"(^|/)tinylora/v_norm$")),
    ("rollout vs trainer mismatch", (r"^rollout_corr/kl$", r"^training/rollout_probs_diff_(mean|max)$")),
)


def load_metrics(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` sorted by step, from a verl file-logger JSONL."""
    rows = read_metrics(path)
    if not rows:
        raise ValueError(f"{path}: no lines of the form {{\"step\": N, \"data\": {{metric: value}}}}")
    return {k: sorted(v) for k, v in series(rows).items()}


def _keys_for(patterns: tuple[str, ...], keys: list[str]) -> list[str]:
    def v_index(k: str) -> tuple[int, str]:
        m = re.search(r"v_(\d+)$", k)
        return (int(m.group(1)) if m else 1 << 30, k)

    return sorted((k for k in keys if any(re.search(p, k) for p in patterns)), key=v_index)


def plot_metrics(source: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the four panels (module docstring) for ``source`` into ``out``; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = find_metrics_file(source)
    series = load_metrics(path)
    out = Path(out) if out else path.with_suffix(".png")
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), constrained_layout=True)
    for ax, (title, patterns) in zip(axes.flat, PANELS):
        keys = _keys_for(patterns, list(series))
        # tab20 so that up to 20 v_i lines get distinct colours (the default cycle repeats after 10).
        colors = plt.get_cmap("tab20").colors if len(keys) > 10 else [None] * len(keys)
        for key, color in zip(keys, colors):
            steps, values = zip(*series[key])
            dashed = key.endswith("v_norm") or key.startswith("val-")
            ax.plot(steps, values, "--" if dashed else "-", marker="o" if len(steps) <= 30 else None,
                    markersize=3, linewidth=1.2, label=key, color="black" if key.endswith("v_norm") else color)
        if title.startswith("rollout") and keys and all(v > 0 for k in keys for _, v in series[k]):
            ax.set_yscale("log")  # KL and probability gaps differ by orders of magnitude
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=7, ncol=2 if len(keys) > 6 else 1, loc="best")
        else:
            ax.text(0.5, 0.5, f"no {title} metrics in this log", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
    steps = sorted({s for v in series.values() for s, _ in v})
    fig.suptitle(f"{path.name}: steps {steps[0]}-{steps[-1]}" if steps else path.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


__all__ = ["PANELS", "load_metrics", "plot_metrics"]
