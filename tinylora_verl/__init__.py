"""tinylora_verl: TinyLoRA ("Learning to Reason in 13 Parameters", arXiv:2602.04118) for verl.

The core (this package's top level) needs only torch: build a config, inject, train ``adapter.parameters()``,
save a few-byte adapter file. The verl integration lives in :mod:`tinylora_verl.verl` and is imported by verl's
hooks, never from here, so importing :mod:`tinylora_verl` stays cheap.
"""

import importlib

# Lazy: verl loads tinylora_verl.rewards by path in reward workers; importing torch there would cost seconds.
_EXPORTS = {
    "ModuleFidelity": "adapter", "TinyLoRAAdapter": "adapter", "find_target_modules": "adapter",
    "inject_tinylora": "adapter", "export_lora": "adapter_io", "load_adapter": "adapter_io",
    "read_adapter": "adapter_io", "save_adapter": "adapter_io", "DEFAULT_TARGET_MODULES": "config",
    "TinyLoRAConfig": "config", "full_svd": "factors", "projections": "factors", "top_r_svd": "factors",
    "BudgetPlan": "tying", "TiePlan": "tying", "build_tie_plan": "tying", "plan_budget": "tying",
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
