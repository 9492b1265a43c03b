"""Guards for the CPU platform layer: verl pin, every verl internal it patches or subclasses, activation.

Activation tests run in a subprocess so this process keeps verl's stock platform.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tinylora_verl.verl import compat
from tinylora_verl.verl.cpu import platform as cpu_platform

REPO = Path(__file__).resolve().parents[3]


def _run_activated(code: str, timeout: int = 240) -> dict:
    env = {
        **os.environ,
        "TINYLORA_VERL_CPU": "1",
        "VERL_USE_EXTERNAL_MODULES": "tinylora_verl.verl.cpu.platform",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_verl_version_is_pinned():
    assert importlib.metadata.version("verl") == compat.SUPPORTED_VERL_VERSION == "0.9.1"
    assert compat.require_verl_version() == "0.9.1"


def test_version_guard_raises_on_other_verl(monkeypatch):
    monkeypatch.setattr(compat.importlib.metadata, "version", lambda name: "0.9.2")
    with pytest.raises(RuntimeError, match="found verl 0.9.2"):
        compat.require_verl_version()


def test_missing_internal_is_named():
    with pytest.raises(RuntimeError, match=r"verl.utils.device:no_such_attr is missing"):
        compat._resolve("verl.utils.device", "no_such_attr")


def test_import_without_flag_has_no_side_effects():
    """In a fresh interpreter without the flag (other tests here activate the platform in this process)."""
    code = ("import sys\nfrom tinylora_verl.verl.cpu import platform as p\n"
            "from verl.plugin.platform import PlatformRegistry\n"
            "print(p._ACTIVE, 'cpu' in PlatformRegistry.registered_names(), "
            "any(isinstance(f, p._VllmAliasFinder) for f in sys.meta_path))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TINYLORA_VERL_CPU", "VERL_USE_EXTERNAL_MODULES")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False False False"


def test_bad_flag_value_is_rejected(monkeypatch):
    monkeypatch.setenv("TINYLORA_VERL_CPU", "yes")
    with pytest.raises(ValueError, match="TINYLORA_VERL_CPU='yes'"):
        cpu_platform.is_enabled()


def test_activation_inside_import_verl_leaves_vllm_unimported():
    """The driver imports verl before Hydra composes the config: vLLM there would delay every config error by
    the 4 s vLLM takes to import (its checks run when the CPU rollout classes load, in the workers)."""
    result = _run_activated(
        """
        import json, sys
        import verl
        from tinylora_verl.verl.cpu import platform as cpu_platform
        print(json.dumps({"active": cpu_platform._ACTIVE, "vllm": sorted(m for m in sys.modules
                          if m == "vllm" or m.startswith(("vllm.", "verl.utils.vllm")))[:5]}))
        """
    )
    assert result == {"active": True, "vllm": []}


def test_light_subset_excludes_modules_that_import_vllm():
    assert compat.is_light("verl.utils.device") and compat.is_light("verl.workers.rollout.replica")
    # verl.workers.engine imports every FSDP engine (1.4 s): its entries are checked where the engine loads.
    assert not compat.is_light("verl.utils.vllm") and not compat.is_light("verl.utils.vllm.utils")
    assert not compat.is_light("verl.workers.rollout.vllm_rollout.utils") and not compat.is_light("vllm.config")
    assert not compat.is_light("verl.workers.engine.base")


@pytest.mark.slow
def test_every_required_internal_exists_and_activation_wires_cpu():
    result = _run_activated(
        """
        import importlib.metadata, json
        import verl
        from tinylora_verl.verl import compat
        from tinylora_verl.verl.cpu import platform as cpu_platform
        compat.check_verl_internals()
        cpu_platform.activate()  # second call must be a no-op
        import verl.utils.distributed as dist_utils
        import verl.workers.engine_workers as engine_workers
        from verl.plugin.platform import get_platform
        from verl.utils.device import get_device_id, get_device_name, get_nccl_backend, is_support_ipc
        from verl.workers.engine.base import EngineRegistry
        from verl.workers.rollout.replica import RolloutReplicaRegistry
        import verl.workers.engine  # registers the FSDP engines
        print(json.dumps({
            "device": get_device_name(),
            "device_id": get_device_id(),
            "backend": get_nccl_backend(),
            "ipc": is_support_ipc(),
            "platform": type(get_platform()).__name__,
            "vllm_version": importlib.metadata.version("vllm"),
            "pg_patched": getattr(dist_utils.initialize_global_process_group_ray, "_tinylora_cpu", False),
            "pg_patched_workers": engine_workers.initialize_global_process_group_ray
                is dist_utils.initialize_global_process_group_ray,
            "engine": EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__,
            "replica": RolloutReplicaRegistry.get("vllm").__name__,
        }))
        """
    )
    assert result["device"] == "cpu" and result["device_id"] == "cpu" and result["backend"] == "gloo"
    assert result["ipc"] is False, "IPC must be off so verl's sender takes the shared-memory path"
    assert result["platform"] == "PlatformCPU"
    # verl/third_party/vllm needs a "vllm" version at all; vLLM's platform detection needs "cpu" in it.
    assert result["vllm_version"].endswith("+cpu")
    assert result["pg_patched"] and result["pg_patched_workers"]
    assert result["engine"] == "FSDPEngineWithLMHead"
    assert result["replica"] == "CpuVLLMReplica"


@pytest.mark.slow
def test_late_activation_fails_loudly():
    env = {k: v for k, v in os.environ.items() if k not in ("TINYLORA_VERL_CPU", "VERL_USE_EXTERNAL_MODULES")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    code = (
        "import verl.workers.engine.fsdp.transformer_impl\n"
        "from tinylora_verl.verl.cpu import platform as cpu_platform\n"
        "cpu_platform.activate()"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and "activated too late" in proc.stderr


@pytest.mark.slow
def test_worker_extension_points_vllm_at_cpu_receiver():
    result = _run_activated(
        """
        import json
        from tinylora_verl.verl.cpu.rollout import CpuVLLMHttpServer, CpuVLLMWorkerExtension
        from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension
        path = CpuVLLMHttpServer._get_worker_extension_cls(None)
        module, name = path.rsplit(".", 1)
        import importlib
        cls = getattr(importlib.import_module(module), name)
        print(json.dumps({"same": cls is CpuVLLMWorkerExtension,
                          "subclass": issubclass(cls, vLLMColocateWorkerExtension)}))
        """
    )
    assert result == {"same": True, "subclass": True}


@pytest.mark.slow
def test_lora_loader_alias_is_still_needed_and_applied():
    """verl 0.9.1's tensor-LoRA loader calls a WeightsMapper method vLLM 0.31 renamed; the alias must be needed
    (else drop it) and in place after the CPU receiver module is imported."""
    result = _run_activated(
        """
        import inspect, json
        from vllm.model_executor.models.utils import WeightsMapper
        had = hasattr(WeightsMapper, "get_unstacked_mapper")
        import verl.utils.vllm.utils as verl_vllm_utils
        calls = "get_unstacked_mapper" in inspect.getsource(verl_vllm_utils.VLLMHijack.hijack)
        from tinylora_verl.verl.cpu import rollout as cpu_rollout
        print(json.dumps({"had": had, "verl_calls": calls,
                          "aliased": WeightsMapper.get_unstacked_mapper is WeightsMapper.get_rename_mapper,
                          "again": cpu_rollout.alias_unstacked_mapper()}))
        """
    )
    assert result == {"had": False, "verl_calls": True, "aliased": True, "again": False}, result


def test_peft_base_sync_names_map_back_to_checkpoint_names():
    """verl's PEFT base sync renames wrapped layers to ``.base_layer.`` (fsdp_utils.replace_lora_wrapper); the CPU
    receiver's reload needs the checkpoint names back. Fails when verl changes the renaming."""
    result = _run_activated(
        """
        import json
        from peft import LoraConfig
        from verl.utils.fsdp_utils import replace_lora_wrapper
        from tinylora_verl.verl.cpu.rollout import base_layer_name
        cfg = LoraConfig(r=8, target_modules=["q_proj", "down_proj"])
        names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight",
                 "model.layers.0.self_attn.q_proj.bias", "model.norm.weight", "model.embed_tokens.weight"]
        sent = [replace_lora_wrapper(n, cfg) for n in names]
        print(json.dumps({"sent": sent, "back": [base_layer_name(n) for n in sent], "names": names}))
        """
    )
    assert result["sent"][0] == "model.layers.0.self_attn.q_proj.base_layer.weight", result
    assert result["back"] == result["names"]
