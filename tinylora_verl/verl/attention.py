"""Which attention implementations keep packed sequences apart (``use_remove_padding``), checked before a run starts.

With ``use_remove_padding: true`` verl's FSDP engine packs a micro-batch's sequences into one row of
``(1, total_tokens)`` with ``attention_mask=None`` and per-sequence ``position_ids`` that restart at 0
(``transformer_impl.py``, ``prepare_model_inputs``). The sequences stay apart only if attention reads those
position ids:

- ``flash_attention_2`` / ``flash_attention_3``: transformers turns restarting position ids into ``cu_seqlens`` for
  the varlen kernels (``modeling_flash_attention_utils._is_packed_sequence``).
- ``sdpa``, ``eager``, ``flex_attention``: transformers builds a block-diagonal causal mask from them
  (``masking_utils.find_packed_sequence_indices``); correct, but the mask and the attention are quadratic in the
  micro-batch's total tokens, not in each sequence's. Transformers without that function let packed sequences
  attend to each other silently, so these are allowed only where it exists.

Anything else (a hub kernel, ``paged_attention``) is refused with remove-padding rather than trusted.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Mapping

VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
MASKED_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
# verl's HFModelConfig default when override_config names none (verl/workers/config/model.py).
VERL_DEFAULT = "flash_attention_2"
# The module each varlen implementation imports (transformers' own checks).
_KERNEL_MODULES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def transformers_packs_masks() -> bool:
    """Whether the installed transformers builds packed-sequence masks from position ids."""
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    return hasattr(masking_utils, "find_packed_sequence_indices")


def packing_implementations() -> tuple[str, ...]:
    """The implementations that keep packed sequences apart with the installed transformers."""
    return VARLEN_IMPLEMENTATIONS + (MASKED_IMPLEMENTATIONS if transformers_packs_masks() else ())


def attention_implementation(override_config: Mapping[str, Any] | None) -> str:
    """The implementation verl will ask transformers for: ``override_config.attn_implementation`` or verl's default."""
    return str((override_config or {}).get("attn_implementation", VERL_DEFAULT))


def check_attention(use_remove_padding: bool, implementation: str, on_gpu: bool) -> None:
    """Raise ``ValueError`` when remove-padding would mix sequences, or a varlen kernel is asked for without its
    package on a GPU (transformers would fail later, inside a worker)."""
    if use_remove_padding and implementation not in packing_implementations():
        raise ValueError(
            f"actor_rollout_ref.model.use_remove_padding=true packs a micro-batch's sequences into one row, and "
            f"attn_implementation={implementation!r} would let them attend to each other. With remove-padding use one "
            f"of {list(packing_implementations())} (actor_rollout_ref.model.override_config.attn_implementation), or set "
            "actor_rollout_ref.model.use_remove_padding=false")
    module = _KERNEL_MODULES.get(implementation)
    if on_gpu and module is not None and importlib.util.find_spec(module) is None:
        raise ValueError(
            f"attn_implementation={implementation!r} (verl's default) needs the {module} package, which is not "
            "installed: pip install flash-attn --no-build-isolation (or use verl's image, which ships it), or set "
            "+actor_rollout_ref.model.override_config.attn_implementation=sdpa")


__all__ = ["MASKED_IMPLEMENTATIONS", "VARLEN_IMPLEMENTATIONS", "attention_implementation", "check_attention",
           "packing_implementations", "transformers_packs_masks"]
