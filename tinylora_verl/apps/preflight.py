"""Checks on the driver, before Ray starts: a bad TinyLoRA configuration fails in seconds, not inside a worker.

The recipes register :class:`Preflight` as a Hydra callback (``hydra.callbacks.tinylora_preflight``), so
``python -m verl.trainer.main_ppo +recipe=...`` runs it on the composed configuration before verl's task function
starts Ray. It checks what the driver can know without weights:

- the TinyLoRA block: keys, types, ranges and modes (:func:`tinylora_verl.verl.options.parse_tinylora_block`);
- verl's LoRA keys against the sync mode, and remove-padding against the attention implementation;
- from the model's ``config.json`` (a local folder, or the Hugging Face cache; never downloaded here): that the
  targets match linears, that the budget is reachable, and that ``r`` fits every target's shape;
- that local data files exist (verl would fail on them after starting Ray);
- the checkpoint verl would resume from (:mod:`tinylora_verl.apps.resume`).

A failure prints one paragraph on stderr, the last thing printed, and exits with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from hydra.experimental.callback import Callback

from ..core.adapter import find_target_modules, resolve_plan
from ..core.tying import canonical_order
from ..verl.attention import attention_implementation, check_attention
from ..verl.options import check_lora_settings, parse_tinylora_block

EXIT_CODE = 2


class PreflightError(ValueError):
    """A configuration the run would fail on, found on the driver."""


def model_config_json(path: str) -> Optional[Path]:
    """The model's ``config.json``: in a local folder, or in the Hugging Face cache for a hub id; None if neither."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local / "config.json" if (local / "config.json").is_file() else None
    if local.is_file():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id=str(path), filename="config.json")
    return Path(found) if isinstance(found, str) else None


def check_targets(config, model_path: str) -> Optional[str]:
    """Targets, budget and ``r`` against the model's shapes (meta device, no weights); returns a note when the
    model's ``config.json`` is not on this machine (the workers check then)."""
    from .models import load_config, meta_model

    found = model_config_json(model_path)
    if found is None:
        return f"{model_path}: no config.json here (not a local folder nor in the Hugging Face cache); the " \
               "targets, budget and r are checked in the workers"
    model = meta_model(load_config(str(found)))
    modules = find_target_modules(model, config.target_modules)  # no match: raises, naming the model's linears
    names = canonical_order(list(modules), config.target_modules)
    resolve_plan(config, names)  # an unreachable budget raises with the nearest reachable counts
    for name in names:
        out_f, in_f = modules[name].weight.shape
        if config.r > min(out_f, in_f):
            raise PreflightError(f"r={config.r} exceeds min(out, in)={min(out_f, in_f)} of {name} "
                                 f"({out_f} x {in_f}); allowed: 1 <= r <= {min(out_f, in_f)}")
    return None


def check_data(data: Mapping[str, Any]) -> None:
    """Local ``data.train_files`` / ``data.val_files`` exist (remote URLs such as ``hdfs://`` are left to verl)."""
    for key in ("train_files", "val_files"):
        value = data.get(key)
        for path in map(str, [value] if isinstance(value, str) else list(value or [])):
            if "://" in path:
                continue
            if path.startswith("~"):
                # verl hands the string to `datasets` unexpanded, which reads <cwd>/~/...
                raise PreflightError(f"data.{key}={path} starts with '~', which verl does not expand (it would read "
                                     f"{Path.cwd() / path}); use an absolute path, e.g. {Path(path).expanduser()}, "
                                     f"or ${{oc.env:HOME}}{path[1:]} as the recipes do")
            if not Path(path).exists():
                raise PreflightError(f"data.{key}={path} does not exist; write GSM8K there with `tinylora-verl data "
                                     f"gsm8k --out-dir {Path(path).parent}` (or MATH with `tinylora-verl data "
                                     "math`), or point the key at your parquet files")


def check_run(cfg: Mapping[str, Any]) -> list[str]:
    """Every driver-side check of a composed ``main_ppo`` configuration; raises on the first problem and returns
    notes about what could not be checked here."""
    model = cfg["actor_rollout_ref"]["model"]
    lora = dict(model.get("lora") or {})
    options, config = parse_tinylora_block(lora.get("tinylora"))
    notes = []
    check_attention(bool(model.get("use_remove_padding", False)),
                    attention_implementation(model.get("override_config")), on_gpu=False)
    check_data(cfg.get("data", {}))
    if config is None:
        return notes
    check_lora_settings(options, config, lora, int(model.get("lora_rank") or 0), model.get("lora_adapter_path"))
    note = check_targets(config, str(model["path"]))
    if note:
        notes.append(note)
    from .resume import check_resume

    notes += check_resume(cfg, options)
    return notes


def _plain(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


class Preflight(Callback):
    """Hydra callback: :func:`check_run` on the composed configuration, before the task function (and Ray).

    A :class:`Callback` subclass so Hydra finds every hook it calls (``on_run_start`` ...), not a warning."""

    def on_job_start(self, config, **kwargs) -> None:
        if "actor_rollout_ref" not in config:  # not a main_ppo configuration
            return
        try:
            cfg = {"actor_rollout_ref": {"model": _plain(config.actor_rollout_ref.model)},
                   "trainer": _plain(config.trainer), "data": _plain(config.data)}
            notes = check_run(cfg)
        except (ValueError, FileNotFoundError, KeyError) as e:
            print(f"\ntinylora_verl: the run would fail, so it stops before starting Ray: {e}", file=sys.stderr,
                  flush=True)
            raise SystemExit(EXIT_CODE) from None
        for note in notes:
            print(f"[tinylora_verl] preflight: {note}", file=sys.stderr, flush=True)


__all__ = ["EXIT_CODE", "Preflight", "PreflightError", "check_run", "check_targets", "model_config_json"]
