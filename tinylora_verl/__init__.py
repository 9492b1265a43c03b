"""tinylora_verl: TinyLoRA ("Learning to Reason in 13 Parameters", arXiv:2602.04118) for verl.

Layers, lowest first (``docs/architecture.md``):

- :mod:`tinylora_verl.kernels`: the CPU C++ kernels behind one small interface (torch only);
- :mod:`tinylora_verl.core`: config, factors, tie plans, the fused op, forwards, the adapter, adapter files (torch
  and safetensors only): build a config, inject, train ``adapter.parameters()``, save a few-byte adapter file;
- :mod:`tinylora_verl.tasks`: data sets, reward functions and evaluation problem sets (no torch);
- :mod:`tinylora_verl.verl`: the only code that imports verl or vLLM (engine, recipes' hooks, CPU platform);
- :mod:`tinylora_verl.apps`: the command line, evaluation, export, sweeps, the demo, studies, plots.

This module re-exports the core's public API, lazily, so importing :mod:`tinylora_verl` stays cheap.
"""

import importlib

# Lazy: reward workers import tinylora_verl.tasks.rewards, which needs no torch; importing the core here would.
_EXPORTS = {
    "ModuleFidelity": "core.adapter", "TinyLoRAAdapter": "core.adapter", "find_target_modules": "core.adapter",
    "inject_tinylora": "core.adapter", "load_adapter": "core.adapter", "export_lora": "core.adapter_io",
    "read_adapter": "core.adapter_io", "save_adapter": "core.adapter_io", "DEFAULT_TARGET_MODULES": "core.config",
    "TinyLoRAConfig": "core.config", "full_svd": "core.factors", "projections": "core.factors",
    "top_r_svd": "core.factors", "BudgetPlan": "core.tying", "TiePlan": "core.tying",
    "build_tie_plan": "core.tying", "plan_budget": "core.tying",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "BudgetPlan",
    "ModuleFidelity",
    "TiePlan",
    "TinyLoRAAdapter",
    "TinyLoRAConfig",
    "build_tie_plan",
    "export_lora",
    "find_target_modules",
    "full_svd",
    "inject_tinylora",
    "load_adapter",
    "plan_budget",
    "projections",
    "read_adapter",
    "save_adapter",
    "top_r_svd",
]
