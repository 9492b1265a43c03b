"""tinylora_verl: TinyLoRA ("Learning to Reason in 13 Parameters", arXiv:2602.04118) for verl.

The core (this package's top level) needs only torch: build a config, inject, train ``adapter.parameters()``,
save a few-byte adapter file. The verl integration lives in :mod:`tinylora_verl.verl` and is imported by verl's
hooks, never from here, so importing :mod:`tinylora_verl` stays cheap.
"""

from .adapter import ModuleFidelity, TinyLoRAAdapter, find_target_modules, inject_tinylora
from .adapter_io import export_lora, load_adapter, read_adapter, save_adapter
from .config import DEFAULT_TARGET_MODULES, TinyLoRAConfig
from .factors import full_svd, projections, top_r_svd
from .tying import BudgetPlan, TiePlan, build_tie_plan, plan_budget

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
