"""The package's layout (docs/architecture.md): layers that import only downwards, no import circles, a torch-only
core, files a reader can take in at once.

Layers, lowest first: ``kernels`` (the CPU C++ kernels), ``core`` (the adapter; torch and safetensors only),
``tasks`` (data, rewards, problem sets; no torch), ``verl`` (the only code importing verl or vLLM), ``apps``
(command line, evaluation, export, sweeps, demo, studies), and the package's ``__init__`` (the public API).
Module-level and function-level imports count alike.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tinylora_verl"
# What each layer may import of the package besides itself.
ALLOWED = {
    "kernels": set(),
    "core": {"kernels"},
    "tasks": set(),
    "verl": {"core", "kernels", "tasks"},
    "apps": {"core", "kernels", "tasks", "verl"},
    "": {"core"},  # tinylora_verl/__init__.py
}
HEAVY = ("verl", "vllm", "datasets", "ray", "hydra", "omegaconf", "transformers")
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "hydra_configs" in path.parts:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (relative imports resolved)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # A name that is a submodule is that module; any other name is an attribute of the stem.
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t.startswith("tinylora_verl") and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_belongs_to_a_layer():
    assert {layer(m) for m in modules()} <= set(ALLOWED)


def test_layers_import_only_downwards():
    wrong = sorted(f"{a} -> {b}" for a, deps in graph().items() for b in deps
                   if layer(b) != layer(a) and layer(b) not in ALLOWED[layer(a)])
    assert not wrong, f"imports against the layering: {wrong}"


def test_no_import_circles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)


def test_the_graph_sees_function_level_imports():
    """The check can fail: a function-level import upwards is found."""
    g = graph()
    assert "tinylora_verl.core.adapter_io" in g["tinylora_verl.core.adapter"]
    assert "tinylora_verl.verl.generation" in g["tinylora_verl.apps.eval"]  # imported inside run_eval


@pytest.mark.parametrize("package", ["tinylora_verl", "tinylora_verl.core", "tinylora_verl.kernels",
                                     "tinylora_verl.tasks"])
def test_lower_layers_import_with_torch_alone(package):
    """A fresh interpreter importing every module of the layer holds none of verl, vLLM, Ray, Hydra, datasets or
    transformers afterwards."""
    names = [m for m in modules() if m == package or (package != "tinylora_verl" and m.startswith(package + "."))]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in names)
            + f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_tasks_need_no_torch():
    code = "import sys, tinylora_verl.tasks.data, tinylora_verl.tasks.rewards; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_files_stay_readable():
    long = {str(p.relative_to(ROOT)): n for p in list(PACKAGE.rglob("*.py")) + list((ROOT / "bench").glob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def top_level_names(path: Path) -> set[str]:
    """What a module defines or imports at its top level, plus ``__all__`` (a lazy ``__getattr__`` serves those)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
                listed = isinstance(node.value, (ast.List, ast.Tuple))
                if isinstance(target, ast.Name) and target.id == "__all__" and listed:
                    names |= {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_every_import_of_the_package_names_something_that_exists():
    """bench/, tests/ and docker/ sit outside the import graph's layers; a name they import from a moved or
    renamed module would only fail when that script runs (bench.gpu_smoke did, after the layout change)."""
    mods, defined_in = modules(), {}
    files = [p for d in ("bench", "tests", "docker", "tinylora_verl") for p in (ROOT / d).rglob("*.py")]
    missing = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("tinylora_verl"):
                if node.module not in mods:
                    missing.append(f"{path.relative_to(ROOT)}: no module {node.module}")
                    continue
                if node.module not in defined_in:
                    defined_in[node.module] = top_level_names(mods[node.module])
                defined = defined_in[node.module]
                missing += [f"{path.relative_to(ROOT)}: {node.module} has no {a.name}" for a in node.names
                            if a.name != "*" and a.name not in defined and f"{node.module}.{a.name}" not in mods]
            elif isinstance(node, ast.Import):
                missing += [f"{path.relative_to(ROOT)}: no module {a.name}" for a in node.names
                            if a.name.startswith("tinylora_verl") and a.name not in mods]
    assert not missing, missing
