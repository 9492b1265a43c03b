"""verl's vLLM server and replica, aware of ``tinylora.sync_mode: native`` (registered by ``verl/register.py``).

With native mode on for the actor it

- asks vLLM for TinyLoRA's hooks: ``additional_config.tinylora_native = {"rank": r}``, which the plugin
  (:mod:`tinylora_verl.verl.native.plugin`) reads in every vLLM worker when it loads the model;
- sleeps at level 1 (weights offloaded and restored) instead of verl's level 2 (weights discarded): after the
  install, steps send only v, so the base weights must survive a sleep, as they must for verl's own LoRA adapters.

Otherwise it is verl's server unchanged. verl internals: ``vLLMHttpServer._preprocess_engine_kwargs`` (engine
arguments before vLLM starts) and ``_resolve_sleep_level`` (the level of every sleep), both in verl 0.9.1.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import ray
from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica

from ..options import parse_tinylora_block, tinylora_block_of
from .plugin import CONFIG_KEY

PLUGIN_NAME = "tinylora_native"


def native_rank_of(model_config) -> Optional[int]:
    """``r`` when the actor's TinyLoRA block asks for ``sync_mode: native``, else None."""
    options, config = parse_tinylora_block(tinylora_block_of(model_config))
    return config.r if config is not None and options.sync_mode == "native" else None


def check_plugin_allowed(env: Optional[str]) -> None:
    """``VLLM_PLUGINS`` (when set) lists the only plugins vLLM loads: the native hooks must be among them."""
    if env is not None and PLUGIN_NAME not in [p.strip() for p in env.split(",")]:
        raise RuntimeError(f"tinylora.sync_mode=native needs vLLM's {PLUGIN_NAME!r} plugin, but VLLM_PLUGINS={env!r} "
                           f"excludes it; add {PLUGIN_NAME} to VLLM_PLUGINS or unset it")


def with_native_key(additional_config, rank: int) -> str:
    """vLLM's ``--additional-config`` JSON with TinyLoRA's key added (verl turns engine kwargs into CLI flags, so
    a dict must go as JSON, as verl does for ``compilation_config``)."""
    extra = json.loads(additional_config) if isinstance(additional_config, str) else dict(additional_config or {})
    extra[CONFIG_KEY] = {"rank": rank}
    return json.dumps(extra, sort_keys=True)


class TinyLoRAVLLMHttpServer(vLLMHttpServer):
    """verl's vLLM server; with native mode it adds the hooks' engine key and sleeps at level 1."""

    def _native_rank(self) -> Optional[int]:
        return native_rank_of(self.model_config)

    def _preprocess_engine_kwargs(self, engine_kwargs: dict) -> None:
        super()._preprocess_engine_kwargs(engine_kwargs)
        rank = self._native_rank()
        if rank is not None:
            check_plugin_allowed(os.environ.get("VLLM_PLUGINS"))
            engine_kwargs["additional_config"] = with_native_key(engine_kwargs.get("additional_config"), rank)

    def _resolve_sleep_level(self) -> int:
        return 1 if self._native_rank() is not None else super()._resolve_sleep_level()


class TinyLoRAVLLMReplica(vLLMReplica):
    """verl's vLLM replica launching :class:`TinyLoRAVLLMHttpServer` actors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(TinyLoRAVLLMHttpServer)
