"""``verl.plugins`` entry point: runs inside ``import verl`` in every process; cheap, and loud when it must be.

In the driver (``python -m verl.trainer.main_ppo +recipe=NAME ...``) it

- checks that ``NAME`` is one of this package's recipes and that the Hydra search-path plugin that makes it
  resolvable is importable; otherwise Hydra would add ``recipe: NAME`` as a plain string and verl would
  quietly train its defaults;
- switches the CPU platform on for recipes that include ``/recipe/cpu_base`` (the driver decides the device
  before Ray starts, so the recipe's ``runtime_env`` is too late for this process).

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

RECIPE_DIR = Path(__file__).resolve().parents[2] / "hydra_configs" / "recipe"
_RECIPE_ARG = re.compile(r"^\+{0,2}recipe=(?P<name>[\w\-./]+)$")
CPU_BASE = "/recipe/cpu_base"


def recipe_dir() -> Path:
    """The packaged recipes (``tinylora_verl/hydra_configs/recipe``), located without importing Hydra."""
    spec = importlib.util.find_spec("tinylora_verl.hydra_configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / "recipe"
    return RECIPE_DIR


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def requested_recipe(argv: Sequence[str]) -> Optional[str]:
    for arg in argv:
        m = _RECIPE_ARG.match(arg)
        if m:
            return m.group("name")
    return None


def recipe_needs_cpu(name: str) -> bool:
    """True when the recipe (or one it includes) lists ``/recipe/cpu_base`` in its defaults."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        path = recipe_dir() / f"{current}.yaml"
        if current == "cpu_base":
            return True
        if path.is_file():
            todo.extend(re.findall(r"^\s*-\s*/recipe/(\w+)\s*$", path.read_text(), flags=re.M))
    return False


def check_driver(argv: Sequence[str]) -> Optional[str]:
    """Validate a ``+recipe=`` argument; return the recipe name, or raise ``SystemExit`` saying what is missing."""
    name = requested_recipe(argv)
    if name is None or not name.startswith(("tinylora", "cpu_base")):
        return None
    recipes = available_recipes()
    if name not in recipes:
        raise SystemExit(f"tinylora_verl: unknown recipe {name!r}; this installation ships {recipes}")
    if not searchpath_plugin_discovered():
        raise SystemExit(
            "tinylora_verl: Hydra does not discover the search-path plugin hydra_plugins.tinylora_verl here, so "
            f"+recipe={name} would be added as a plain string and verl would train its defaults. Install the "
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


def _activate_cpu_if_requested(name: Optional[str]) -> None:
    if name is None or not recipe_needs_cpu(name):
        return
    os.environ.setdefault("TINYLORA_VERL_CPU", "1")
    from . import cpu_platform

    cpu_platform.activate()


def _main() -> None:
    name = check_driver(sys.argv[1:])
    try:
        _activate_cpu_if_requested(name)
    except Exception as e:  # verl would hide this at debug level; the run must not go on without the platform
        raise SystemExit(f"tinylora_verl: could not activate the CPU platform for +recipe={name}: {e!r}") from e


_main()
