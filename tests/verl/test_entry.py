"""Discovery (Hydra plugin, verl.plugins entry point), the missing-plugin guard, and the verl 0.9.1 pin."""

import importlib.metadata
import inspect
import subprocess
import sys

import pytest

from tinylora_verl.verl import entry


def test_hydra_discovers_the_searchpath_plugin():
    assert entry.searchpath_plugin_discovered()


def test_verl_plugins_entry_point_is_registered_and_imports_cleanly():
    eps = [ep for ep in importlib.metadata.entry_points(group="verl.plugins") if ep.name == "tinylora"]
    assert [ep.value for ep in eps] == ["tinylora_verl.verl.entry"]
    eps[0].load()


@pytest.mark.parametrize("argv, name", [
    (["+recipe=tinylora_gsm8k"], "tinylora_gsm8k"),
    (["trainer.nnodes=2", "+recipe=tinylora_math"], "tinylora_math"),
    (["recipe=tinylora_gsm8k_cpu"], "tinylora_gsm8k_cpu"),
    (["trainer.nnodes=2"], None),
    (["+recipe=dapo"], None),
])
def test_check_driver_accepts_known_recipes(argv, name):
    assert entry.check_driver(argv) == name


def test_unknown_recipe_fails_loudly():
    with pytest.raises(SystemExit, match=r"unknown recipe 'tinylora_gsm8", ) as e:
        entry.check_driver(["+recipe=tinylora_gsm8"])
    assert "tinylora_gsm8k_cpu" in str(e.value)


def test_undiscoverable_plugin_fails_loudly(monkeypatch):
    monkeypatch.setattr(entry, "searchpath_plugin_discovered", lambda: False)
    with pytest.raises(SystemExit, match=r"\+recipe=tinylora_gsm8k \+hardware=cpu would be added as plain strings and "
                                         r"verl would train its defaults"):
        entry.check_driver(["+recipe=tinylora_gsm8k", "+hardware=cpu"])


def test_cpu_recipes_are_detected():
    assert entry.recipe_needs_cpu("tinylora_gsm8k_cpu") and entry.recipe_needs_cpu("tinylora_gsm8k_cpu_learn")
    assert not entry.recipe_needs_cpu("tinylora_gsm8k") and not entry.recipe_needs_cpu("tinylora_math")
    assert entry.recipe_hardware("tinylora_gsm8k_1gpu") == {"gpu1_24gb"}


@pytest.mark.parametrize("argv, name", [
    (["+recipe=tinylora_gsm8k", "+hardware=cpu"], "tinylora_gsm8k"),
    (["+recipe=tinylora_math", "trainer.nnodes=1", "+hardware=cpu"], "tinylora_math"),
    (["+hardware=cpu"], None),
])
def test_check_driver_accepts_hardware_after_the_recipe(argv, name):
    assert entry.check_driver(argv) == name
    assert entry.requested_hardware(argv) == "cpu"


def test_unknown_hardware_fails_loudly():
    with pytest.raises(SystemExit, match=r"unknown hardware overlay 'tpu' \(\+hardware=tpu\); this installation ships "
                                         r"\['cpu'"):
        entry.check_driver(["+recipe=tinylora_gsm8k", "+hardware=tpu"])


def test_hardware_before_the_recipe_fails_loudly():
    """Hydra applies appended configs in command-line order: the recipe would override the overlay silently."""
    with pytest.raises(SystemExit, match=r"\+hardware=cpu comes before \+recipe=, so the recipe's values would "
                                         r"override the overlay's"):
        entry.check_driver(["+hardware=cpu", "+recipe=tinylora_gsm8k"])


@pytest.mark.parametrize("argv, program", [
    (["+recipe=tinylora_gsm8k_sft"], "/venv/site-packages/verl/trainer/sft_trainer.py"),
    (["+recipe=tinylora_gsm8k_sft", "+hardware=cpu_sft"], "/venv/site-packages/verl/trainer/sft_trainer.py"),
    (["+recipe=tinylora_gsm8k", "+hardware=cpu"], "/venv/site-packages/verl/trainer/main_ppo.py"),
    (["+recipe=tinylora_gsm8k_sft"], "/usr/bin/some_launcher"),
])
def test_check_driver_accepts_each_recipe_under_its_trainer(argv, program):
    assert entry.check_driver(argv, program=program) == argv[0].split("=")[1]


@pytest.mark.parametrize("argv, program, bad, needed", [
    (["+recipe=tinylora_gsm8k_sft"], "/v/verl/trainer/main_ppo.py", "recipe=tinylora_gsm8k_sft", "sft_trainer"),
    (["+recipe=tinylora_gsm8k"], "/v/verl/trainer/sft_trainer.py", "recipe=tinylora_gsm8k", "main_ppo"),
    (["+recipe=tinylora_gsm8k_sft", "+hardware=cpu"], "/v/verl/trainer/sft_trainer.py", "hardware=cpu", "main_ppo"),
    (["+recipe=tinylora_gsm8k", "+hardware=cpu_sft"], "/v/verl/trainer/main_ppo.py", "hardware=cpu_sft",
     "sft_trainer"),
])
def test_a_recipe_for_the_other_trainer_fails_loudly(argv, program, bad, needed):
    with pytest.raises(SystemExit, match=rf"\+{bad} is written for verl.trainer.{needed}, but this is "
                                         rf"{program}; .* would run its defaults"):
        entry.check_driver(argv, program=program)


def test_main_ppo_refuses_an_sft_recipe():
    """Under `python -m`, sys.argv[0] is still "-m" inside `import verl`; the check reads sys.orig_argv."""
    out = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", "+recipe=tinylora_gsm8k_sft", "--cfg", "job"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert ("+recipe=tinylora_gsm8k_sft is written for verl.trainer.sft_trainer, but this is verl.trainer.main_ppo"
            in out.stderr), out.stderr[-2000:]


def test_cpu_sft_overlay_switches_the_cpu_platform_on():
    assert "cpu_sft" in entry.CPU_HARDWARE and entry.is_sft("cpu_sft") and entry.is_sft("tinylora_gsm8k_sft")
    assert not entry.recipe_needs_cpu("tinylora_gsm8k_sft")


def test_main_ppo_refuses_an_unknown_recipe():
    """The guard runs inside `import verl` in the real driver and stops the run before Hydra composes."""
    out = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", "+recipe=tinylora_nope", "--cfg", "job"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "tinylora_verl: unknown recipe 'tinylora_nope'" in out.stderr


def test_main_ppo_resolves_data_paths_without_a_tilde(tmp_path):
    """The README's check: `main_ppo +recipe=tinylora_gsm8k --cfg job --resolve` shows absolute data paths."""
    import os

    out = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", "+recipe=tinylora_gsm8k", "--cfg", "job",
                          "--resolve"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HOME=str(tmp_path)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"train_files: {tmp_path}/data/gsm8k/train.parquet" in out.stdout
    assert f"val_files: {tmp_path}/data/gsm8k/test.parquet" in out.stdout
    assert not [line for line in out.stdout.splitlines() if "_files:" in line and "~" in line]


def test_main_ppo_refuses_hardware_before_the_recipe():
    out = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", "+hardware=cpu", "+recipe=tinylora_gsm8k",
                          "--cfg", "job"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "put +hardware=cpu after the recipe" in out.stderr


def test_main_ppo_composes_the_recipe():
    out = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", "+recipe=tinylora_gsm8k", "--cfg", "job"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "external_lib: tinylora_verl.verl.register" in out.stdout
    assert "\nrecipe: " not in out.stdout, "the recipe was added as a plain string"


def test_worker_without_the_plugin_fails_loudly():
    """Workers import model.external_lib through verl, which raises when the package is missing there."""
    from verl.utils.import_utils import import_external_libs

    with pytest.raises(ModuleNotFoundError, match="tinylora_verl_absent"):
        import_external_libs("tinylora_verl_absent.verl.register")


# ---------------------------------------------------------------------------------------------- verl pin
# Each verl internal the engine relies on, with why; a failure here means verl moved under the pin.


def test_verl_is_the_pinned_version():
    assert importlib.metadata.version("verl") == "0.9.1"


@pytest.mark.parametrize("method", [
    "_build_module", "_build_fsdp_module", "_build_optimizer", "optimizer_step", "train_batch",
    "get_per_tensor_param", "get_per_tensor_param_shard", "get_per_tensor_param_delta_shard",
    "save_checkpoint", "load_checkpoint", "disable_adapter",
])
def test_engine_overrides_match_verl_signatures(method):
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from tinylora_verl.verl.engine import TinyLoRAFSDPEngine

    ours = inspect.signature(getattr(TinyLoRAFSDPEngine, method)).parameters
    theirs = inspect.signature(getattr(FSDPEngineWithLMHead, method)).parameters
    assert list(ours)[: len(theirs)] == list(theirs), f"{method}: verl has {list(theirs)}, ours {list(ours)}"


def test_build_order_inject_before_fsdp_then_optimizer():
    """TinyLoRA is injected in _build_module, i.e. before FSDP wrapping and before the optimizer is built."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    src = inspect.getsource(FSDPEngine._build_model_optimizer)
    assert src.index("self._build_module()") < src.index("self._build_fsdp_module(module)") < src.index(
        "self._build_optimizer(module)")


def test_fsdp2_load_broadcasts_buffers():
    """Factors are non-persistent buffers computed where weights exist; verl's FSDP2 load broadcasts them."""
    from verl.utils import fsdp_utils

    src = inspect.getsource(fsdp_utils.fsdp2_load_full_state_dict)
    assert "named_buffers()" in src and "dist.broadcast(buf, src=0)" in src


def test_ref_in_actor_follows_lora_adapter_path():
    """The MATH recipe's KL reference is the actor with v off because verl keys ref_in_actor off this path."""
    from verl.trainer.ppo.v1 import trainer_base

    src = inspect.getsource(trainer_base)
    assert src.count('get("lora_adapter_path") is not None') >= 2


def test_engine_registry_lookup_order():
    """(device, vendor) is looked up before device alone: how the TinyLoRA engine wins without a patch."""
    from verl.workers.engine.base import EngineRegistry

    src = inspect.getsource(EngineRegistry.get_engine_cls)
    assert src.index("vendor_key in registry") < src.index("if device in registry")
