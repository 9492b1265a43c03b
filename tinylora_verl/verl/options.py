"""The ``actor_rollout_ref.model.lora.tinylora`` block: core adapter settings plus verl-side switches.

verl's ``HFModelConfig`` is a strict dataclass except for ``lora`` (a free-form dict), so TinyLoRA's settings
live there. This module only parses plain mappings and imports no verl code, so the driver can validate a
recipe before Ray starts and tests can check it without a cluster.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ..core.config import TinyLoRAConfig

SYNC_DTYPES = ("bfloat16", "float16", "float32")
SYNC_MODES = ("merged", "lora", "native")
# Set as model.lora_adapter_path, it makes verl compute the KL reference inside the actor (trainer_base.py:237)
# through disable_adapter(); PEFT LoRA stays off because lora_rank is 0.
REF_IN_ACTOR_MARKER = "tinylora://actor-as-reference"


@dataclass
class TinyLoRAVerlOptions:
    """verl-side switches of the TinyLoRA engine.

    Args:
        enable: inject TinyLoRA into the actor (the ref engine, forward-only, always stays plain).
        sync_dtype: dtype of the weights (merged mode) or LoRA factors (lora mode) streamed to the rollout.
        sync_mode: ``merged`` streams ``cast(W + ΔW)`` under the base's HF names; ``lora`` streams ΔW as its exact
            rank-r LoRA through verl's LoRA adapter path (needs ``model.lora.rank >= r``, ``model.lora_rank: 0``),
            so ΔW is no longer rounded against W and a sync is a few MB instead of the whole model; ``native``
            installs each target's frozen factors in vLLM once and then sends only v (tens of bytes), from which
            vLLM's TinyLoRA plugin computes the exact update in float32 (tinylora_verl.verl.native).
        log_v_max: log every v value per step when there are at most this many.
        max_nonfinite_steps: stop the run with an error after this many consecutive optimizer steps whose gradient
            (or update) was not finite and was skipped; checkpoints already written keep their finite v.
        strict_resume: stop instead of falling back to the newest intact checkpoint when the one verl would resume
            from is damaged or holds a non-finite v (tinylora_verl.apps.resume).
    """

    enable: bool = field(default=False, metadata={"help": "Inject TinyLoRA into the actor engine."})
    sync_dtype: str = field(default="bfloat16", metadata={"help": f"dtype of what is sent to the rollout: {SYNC_DTYPES}."})
    sync_mode: str = field(default="merged", metadata={"help": f"How the adapter reaches the rollout: {SYNC_MODES}."})
    log_v_max: int = field(default=64, metadata={"help": "Log each v value per step up to this many values."})
    max_nonfinite_steps: int = field(default=3, metadata={
        "help": "Stop after this many consecutive skipped (non-finite) optimizer steps."})
    strict_resume: bool = field(default=False, metadata={
        "help": "Stop rather than resume from an older intact checkpoint when the latest is damaged."})

    def __post_init__(self) -> None:
        if not isinstance(self.enable, bool):
            raise ValueError(f"`tinylora.enable` should be true or false, but the value passed is {self.enable!r}")
        if self.sync_dtype not in SYNC_DTYPES:
            raise ValueError(
                f"`tinylora.sync_dtype` should be one of {list(SYNC_DTYPES)}, but the value passed is {self.sync_dtype!r}"
            )
        if self.sync_mode not in SYNC_MODES:
            raise ValueError(
                f"`tinylora.sync_mode` should be one of {list(SYNC_MODES)}, but the value passed is {self.sync_mode!r}"
            )
        if isinstance(self.log_v_max, bool) or not isinstance(self.log_v_max, int) or self.log_v_max < 0:
            raise ValueError(f"`tinylora.log_v_max` should be an integer >= 0, but the value passed is {self.log_v_max!r}")
        if (isinstance(self.max_nonfinite_steps, bool) or not isinstance(self.max_nonfinite_steps, int)
                or self.max_nonfinite_steps < 1):
            raise ValueError(f"`tinylora.max_nonfinite_steps` should be an integer >= 1, but the value passed is "
                             f"{self.max_nonfinite_steps!r}")
        if not isinstance(self.strict_resume, bool):
            raise ValueError(f"`tinylora.strict_resume` should be true or false, but the value passed is "
                             f"{self.strict_resume!r}")


_OPTION_KEYS = {f.name for f in dataclasses.fields(TinyLoRAVerlOptions)}


def parse_tinylora_block(block: Optional[Mapping[str, Any]]) -> tuple[TinyLoRAVerlOptions, Optional[TinyLoRAConfig]]:
    """Split a ``lora.tinylora`` mapping into (verl options, core config); the config is None when disabled."""
    if block is None:
        return TinyLoRAVerlOptions(), None
    if not isinstance(block, Mapping):
        raise ValueError(f"`actor_rollout_ref.model.lora.tinylora` should be a mapping, got {type(block).__name__}")
    block = {k: (list(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "ListConfig" else v) for k, v in block.items()}
    options = TinyLoRAVerlOptions(**{k: v for k, v in block.items() if k in _OPTION_KEYS})
    core = {k: v for k, v in block.items() if k not in _OPTION_KEYS}
    config = TinyLoRAConfig.from_dict(core)
    return options, (config if options.enable else None)


def check_lora_settings(options: TinyLoRAVerlOptions, config: TinyLoRAConfig, lora: Mapping[str, Any],
                        lora_rank: int, lora_adapter_path: Optional[str] = None) -> None:
    """verl's LoRA keys against TinyLoRA's: ``model.lora_rank`` makes verl wrap the model in peft (never with TinyLoRA);
    ``model.lora.rank`` makes the rollout serve a LoRA (exactly what ``sync_mode: lora`` needs, nothing else);
    ``model.lora_adapter_path`` is only the marker that puts the KL reference inside the actor."""
    if lora_rank > 0:
        raise ValueError(f"TinyLoRA and verl's PEFT LoRA are both enabled (model.lora_rank={lora_rank}); set "
                         "model.lora_rank=0 to train TinyLoRA")
    rank = int(lora.get("rank", 0) or 0)
    if options.sync_mode != "lora" and rank > 0:
        raise ValueError(f"model.lora.rank={rank} would make vLLM serve a LoRA that sync_mode={options.sync_mode} "
                         "never sends; set model.lora.rank=0, or tinylora.sync_mode=lora")
    if options.sync_mode == "lora":
        if rank < config.r:
            raise ValueError(f"tinylora.sync_mode=lora needs actor_rollout_ref.model.lora.rank >= r={config.r} "
                             f"(vLLM's LoRA slot), got {rank}")
        if lora.get("merge", False):
            raise ValueError("tinylora.sync_mode=lora sends an adapter; model.lora.merge=true would ask verl to merge "
                             "it: set model.lora.merge=false")
    if lora_adapter_path not in (None, REF_IN_ACTOR_MARKER):
        raise ValueError(f"model.lora_adapter_path={lora_adapter_path!r} would be ignored with TinyLoRA; allowed: "
                         f"null, or {REF_IN_ACTOR_MARKER!r} to use the actor without v as the KL reference")


def tinylora_block_of(model_config: Any) -> Optional[Mapping[str, Any]]:
    """``model_config.lora['tinylora']`` from an ``HFModelConfig`` or an OmegaConf/dict model section."""
    lora = getattr(model_config, "lora", None)
    if lora is None and isinstance(model_config, Mapping):
        lora = model_config.get("lora")
    if not lora:
        return None
    return lora.get("tinylora")
