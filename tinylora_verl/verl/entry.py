"""``verl.plugins`` entry point: runs inside ``import verl`` in every process; cheap, and loud when it must be.

In the driver (``python -m verl.trainer.main_ppo +recipe=NAME ...``) it

- checks that ``NAME`` is one of this package's recipes (and a ``+hardware=HW`` overlay one of its overlays,
  placed after the recipe) and that the Hydra search-path plugin that makes them resolvable is importable;
  otherwise Hydra would add ``recipe: NAME`` as a plain string and verl would quietly train its defaults;
- checks that an SFT recipe or overlay (``*_sft``: verl's SFT trainer's config tree) runs under
  ``verl.trainer.sft_trainer`` and the others under ``main_ppo``: composed into the wrong trainer, its keys land
  beside the ones that trainer reads, and it too would run its defaults;
- switches the CPU platform on for ``+hardware=cpu`` / ``+hardware=cpu_sft`` and for recipes that include either (the
  driver decides the device before Ray starts, so the overlay's ``runtime_env`` is too late for this process; the
  SFT trainer has no Ray and runs in this process).

In every other process (Ray workers: the TaskRunner that builds the rollout replicas among them) it registers
TinyLoRA's vLLM replica under verl's ``vllm`` rollout name (:mod:`tinylora_verl.verl.native.server`): verl's
server unchanged unless the actor's ``tinylora.sync_mode`` is ``native``. Where the CPU platform is active (it runs
first, through ``VERL_USE_EXTERNAL_MODULES``), its replica, which derives from that server, stays.

It also registers the OmegaConf resolver ``${tinylora_cpu_dtype:}`` that the CPU overlay's precision keys use, in
every process that may resolve a config.

verl swallows ``Exception`` from entry points at debug level, so failures here raise ``SystemExit``, which
it does not catch. Nothing essential depends on this module: engine registration happens through
``model.external_lib``, which verl imports (and fails loudly on) in every worker.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

CONFIG_DIR = Path(__file__).resolve().parents[2] / "hydra_configs"
CPU_DTYPE_RESOLVER = "tinylora_cpu_dtype"
_GROUP_ARG = re.compile(r"^\+{0,2}(?P<group>recipe|hardware)=(?P<name>[\w\-./]+)$")
# The overlays that run on the CPU platform: main_ppo's and the SFT trainer's (their config trees differ).
CPU_HARDWARE = ("cpu", "cpu_sft")
# Recipes and overlays for verl's SFT trainer end with this.
SFT_SUFFIX = "_sft"


def config_dir(group: str = "recipe") -> Path:
    """A packaged config group folder (``tinylora_verl/hydra_configs/<group>``), located without importing Hydra."""
    spec = importlib.util.find_spec("tinylora_verl.hydra_configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / group
    return CONFIG_DIR / group


def register_resolvers() -> None:
    """``${tinylora_cpu_dtype:}`` for the hardware overlays (idempotent)."""
    from omegaconf import OmegaConf

    from .cpu import precision

    if not OmegaConf.has_resolver(CPU_DTYPE_RESOLVER):
        OmegaConf.register_new_resolver(CPU_DTYPE_RESOLVER, lambda: precision.cpu_dtype())


def recipe_dir() -> Path:
    return config_dir("recipe")


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def available_hardware() -> list[str]:
    return sorted(p.stem for p in config_dir("hardware").glob("*.yaml"))


def _requested(argv: Sequence[str], group: str) -> tuple[Optional[str], int]:
    for i, arg in enumerate(argv):
        m = _GROUP_ARG.match(arg)
        if m and m.group("group") == group:
            return m.group("name"), i
    return None, -1


def requested_hardware(argv: Sequence[str]) -> Optional[str]:
    return _requested(argv, "hardware")[0]


def recipe_hardware(name: str) -> set[str]:
    """The hardware overlays the recipe (or a recipe it includes) lists in its defaults (``- /hardware/NAME``)."""
    seen, todo, found = set(), [name], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        path = recipe_dir() / f"{current}.yaml"
        if path.is_file():
            text = path.read_text()
            todo.extend(re.findall(r"^\s*-\s*/recipe/(\w+)\s*$", text, flags=re.M))
            found.update(re.findall(r"^\s*-\s*/hardware/(\w+)\s*$", text, flags=re.M))
    return found


def recipe_needs_cpu(name: str) -> bool:
    """True when the recipe (or one it includes) composes a CPU hardware overlay (``/hardware/cpu``, ``cpu_sft``)."""
    return bool(recipe_hardware(name) & set(CPU_HARDWARE))


def is_sft(config_name: str) -> bool:
    """Whether a recipe or hardware overlay is written for verl's SFT trainer (its config tree is not main_ppo's)."""
    return config_name.endswith(SFT_SUFFIX)


def launched_program() -> str:
    """The script or ``-m`` module this process runs. Inside ``import verl`` under ``python -m verl.trainer.X``,
    ``sys.argv[0]`` is still ``"-m"`` (runpy imports the parent packages first), so the module comes from
    ``sys.orig_argv``."""
    if sys.argv and sys.argv[0] not in ("-m", "-c", ""):
        return sys.argv[0]
    orig = list(getattr(sys, "orig_argv", []))
    for flag, value in zip(orig, orig[1:]):
        if flag == "-m":
            return value
    return ""


def trainer_of(program: str) -> Optional[str]:
    """``"sft"`` for verl's SFT trainer, ``"ppo"`` for ``main_ppo`` (a script path or a ``-m`` module name),
    ``None`` for anything else (not checked)."""
    leaf = Path(program).stem if program.endswith(".py") else program.rsplit(".", 1)[-1]
    return {"sft_trainer": "sft", "main_ppo": "ppo"}.get(leaf)


def _check_trainer(program: str, **configs: Optional[str]) -> None:
    trainer = trainer_of(program)
    if trainer is None:
        return
    for group, config in configs.items():
        if config is not None and is_sft(config) != (trainer == "sft"):
            needed = "verl.trainer.sft_trainer" if is_sft(config) else "verl.trainer.main_ppo"
            raise SystemExit(f"tinylora_verl: +{group}={config} is written for {needed}, but this is "
                             f"{program}; its keys would not reach the trainer, which would run its defaults")


def check_driver(argv: Sequence[str], program: str = "") -> Optional[str]:
    """Validate ``+recipe=`` / ``+hardware=`` arguments; return the recipe name, or raise ``SystemExit`` saying what
    is wrong. A hardware overlay must come after the recipe: Hydra applies appended configs in command-line order, so
    a recipe listed later would put its own model, batch sizes and lengths back over the overlay's. ``program``
    (:func:`launched_program`) names the trainer: SFT recipes and overlays (``*_sft``) run only under verl's SFT trainer, the
    others only under ``main_ppo``."""
    name, recipe_at = _requested(argv, "recipe")
    hardware, hardware_at = _requested(argv, "hardware")
    if name is not None and not name.startswith("tinylora"):
        name = None  # another package's recipe: not ours to check
    if name is None and hardware is None:
        return None
    if name is not None and name not in available_recipes():
        raise SystemExit(f"tinylora_verl: unknown recipe {name!r}; this installation ships {available_recipes()}")
    if hardware is not None:
        if hardware not in available_hardware():
            raise SystemExit(f"tinylora_verl: unknown hardware overlay {hardware!r} (+hardware={hardware}); this "
                             f"installation ships {available_hardware()}")
        if 0 <= recipe_at and hardware_at < recipe_at:
            raise SystemExit(f"tinylora_verl: +hardware={hardware} comes before +recipe=, so the recipe's values "
                             f"would override the overlay's; put +hardware={hardware} after the recipe")
    _check_trainer(program, recipe=name, hardware=hardware)
    if not searchpath_plugin_discovered():
        raise SystemExit(
            "tinylora_verl: Hydra does not discover the search-path plugin hydra_plugins.tinylora_verl here, so "
            f"{' '.join(a for a in argv if _GROUP_ARG.match(a))} would be added as plain strings and verl would train "
            "its defaults. Install the "
            "package (pip install tinylora-verl; for development: pip install -e . --config-settings "
            "editable_mode=strict) rather than putting it on PYTHONPATH"
        )
    return name


def searchpath_plugin_discovered() -> bool:
    """Whether Hydra's own plugin scan finds ours (an importable module is not enough: the scan walks the
    ``hydra_plugins`` namespace path, which setuptools' default editable finder leaves empty)."""
    if importlib.util.find_spec("hydra_plugins.tinylora_verl.searchpath") is None:
        return False
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    return "TinyLoRASearchPathPlugin" in {p.__name__ for p in Plugins.instance().discover(SearchPathPlugin)}


def _activate_cpu_if_requested(name: Optional[str], hardware: Optional[str]) -> None:
    if hardware not in CPU_HARDWARE and (name is None or not recipe_needs_cpu(name)):
        return
    os.environ.setdefault("TINYLORA_VERL_CPU", "1")
    from .cpu import platform

    platform.activate()


def _load_native_aware_replica():
    from .native.server import TinyLoRAVLLMReplica

    return TinyLoRAVLLMReplica


def register_rollout() -> bool:
    """Register TinyLoRA's vLLM replica unless the CPU platform registered its own; returns whether it did."""
    cpu = sys.modules.get("tinylora_verl.verl.cpu.platform")
    if cpu is not None and getattr(cpu, "_ACTIVE", False):
        return False
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register("vllm", _load_native_aware_replica)
    return True


def _main() -> None:
    register_resolvers()
    name = check_driver(sys.argv[1:], program=launched_program())
    hardware = requested_hardware(sys.argv[1:])
    if name is None and hardware is None:
        # Not a main_ppo launch with a TinyLoRA recipe (the driver builds no replica and must fail fast).
        register_rollout()
    try:
        _activate_cpu_if_requested(name, hardware)
    except Exception as e:  # verl would hide this at debug level; the run must not go on without the platform
        raise SystemExit(f"tinylora_verl: could not activate the CPU platform for +recipe={name} "
                         f"+hardware={hardware}: {e!r}") from e


_main()
