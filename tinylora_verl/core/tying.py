"""Tie plans (which modules share a trainable vector) and the paper's budget planner.

Modules are put in a canonical layer-major order: layer index first, then the position of the module's
suffix in ``target_modules``, then the name. Canonical rather than traversal order, so the same config gives
the same groups in every process and for every wrapper around the model.

With ``n`` modules, vectors of length ``u`` and ``t`` modules per group, the trainable count is
``u · groups(t)``: ``groups = ⌈n/t⌉`` for ``tiled``, ``Σ_types ⌈n_type/t⌉`` for ``structured``, ``n`` for
``none`` and ``1`` for ``full``. The paper's guideline (section 6.3) is to shrink ``u`` to 1 before tying
modules, so a budget ``B ≥ n`` is met with ``u = B/n`` untied, and ``B < n`` with ``u = 1`` and the smallest
``t`` whose group count is ``B``. Qwen2.5-7B (196 modules) at budget 13 gives ``u = 1, t = 16``.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

_LAYER_RE = re.compile(r"\.(\d+)\.")


def _suffix(name: str, target_modules: tuple[str, ...]) -> str:
    for s in target_modules:
        if name == s or name.endswith("." + s):
            return s
    raise ValueError(f"module {name!r} matches none of target_modules {list(target_modules)}")


def canonical_order(names: list[str], target_modules: tuple[str, ...]) -> list[str]:
    """Sort module names layer-major: (first layer index in the name, suffix position, name)."""

    def key(name: str) -> tuple[int, int, str]:
        m = _LAYER_RE.search("." + name + ".")
        return (int(m.group(1)) if m else -1, target_modules.index(_suffix(name, target_modules)), name)

    if len(set(names)) != len(names):
        raise ValueError("module names must be unique")
    return sorted(names, key=key)


@dataclass(frozen=True)
class TiePlan:
    """Which modules share which vector: ``groups[g]`` lists the modules whose ΔW uses ``v_g``."""

    mode: str
    u: int
    tie_size: int
    groups: tuple[tuple[str, ...], ...]

    @property
    def num_params(self) -> int:
        return self.u * len(self.groups)

    @property
    def module_names(self) -> list[str]:
        return [n for g in self.groups for n in g]

    def group_of(self, module_name: str) -> int:
        for i, g in enumerate(self.groups):
            if module_name in g:
                return i
        raise KeyError(f"module {module_name!r} is in no tie group")

    def bytes(self, dtype_bytes: int) -> int:
        return self.num_params * dtype_bytes

    def describe(self) -> str:
        """A human-readable table: one row per group with its size and first/last member."""
        lines = [
            f"tie_mode={self.mode} u={self.u} modules_per_group={self.tie_size} groups={len(self.groups)} "
            f"trainable={self.num_params} ({self.bytes(4)} B fp32, {self.bytes(2)} B bf16)",
            f"{'group':>5}  {'modules':>7}  {'first':<40}  last",
        ]
        for i, g in enumerate(self.groups):
            lines.append(f"{i:>5}  {len(g):>7}  {g[0]:<40}  {g[-1]}")
        return "\n".join(lines)


def _chunks(names: list[str], size: int) -> list[tuple[str, ...]]:
    return [tuple(names[i : i + size]) for i in range(0, len(names), size)]


def build_tie_plan(names: list[str], target_modules: tuple[str, ...], mode: str, tie_size: int, u: int) -> TiePlan:
    """Group ``names`` into tie groups for ``mode`` with ``tie_size`` modules per group."""
    if not names:
        raise ValueError("cannot build a tie plan for zero modules")
    ordered = canonical_order(list(names), target_modules)
    if mode == "none":
        groups = _chunks(ordered, 1)
        tie_size = 1
    elif mode == "full":
        groups = [tuple(ordered)]
        tie_size = len(ordered)
    elif mode == "tiled":
        groups = _chunks(ordered, tie_size)
    elif mode == "structured":
        groups = []
        for suffix in target_modules:
            same = [n for n in ordered if _suffix(n, target_modules) == suffix]
            groups.extend(_chunks(same, tie_size))
    else:
        raise ValueError(f"`tie_mode` should be one of ['none', 'tiled', 'structured', 'full'], got {mode!r}")
    return TiePlan(mode=mode, u=u, tie_size=tie_size, groups=tuple(groups))


def _group_counts(names: list[str], target_modules: tuple[str, ...], mode: str) -> dict[int, int]:
    """Map each reachable group count to the smallest modules-per-group that gives it."""
    n = len(names)
    if mode == "none":
        return {n: 1}
    if mode == "full":
        return {1: n}
    per_type = [sum(1 for x in names if _suffix(x, target_modules) == s) for s in target_modules]
    counts: dict[int, int] = {}
    for t in range(1, n + 1):
        g = -(-n // t) if mode == "tiled" else sum(-(-c // t) for c in per_type if c)
        counts.setdefault(g, t)
    return counts


@dataclass(frozen=True)
class BudgetPlan:
    """The planner's answer: vector length, modules per group, and what it costs."""

    budget: int
    mode: str
    num_modules: int
    u: int
    tie_size: int
    num_groups: int

    @property
    def num_params(self) -> int:
        return self.u * self.num_groups

    @property
    def bytes_fp32(self) -> int:
        return 4 * self.num_params

    @property
    def bytes_bf16(self) -> int:
        return 2 * self.num_params


def plan_budget(module_names: list[str], budget: int, tie_mode: str = "tiled", target_modules=None) -> BudgetPlan:
    """Pick ``u`` and modules-per-group so exactly ``budget`` scalars are trained (paper: u → 1 before tying).

    Raises ``ValueError`` naming the nearest reachable counts when ``budget`` cannot be met exactly.
    """
    from .config import DEFAULT_TARGET_MODULES

    target_modules = tuple(target_modules or DEFAULT_TARGET_MODULES)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"`budget` should be an integer >= 1, but the value passed is {budget!r}")
    names = list(module_names)
    if not names:
        raise ValueError("plan_budget got no modules; check target_modules against the model")
    counts = _group_counts(names, target_modules, tie_mode)
    untied = max(counts)
    n = len(names)
    if budget in counts:
        return BudgetPlan(budget, tie_mode, n, 1, counts[budget], budget)
    if budget % untied == 0:
        return BudgetPlan(budget, tie_mode, n, budget // untied, counts[untied], untied)
    reachable = sorted(set(counts) | {untied * k for k in range(2, budget // untied + 2)})
    i = bisect.bisect_left(reachable, budget)
    nearest = reachable[max(0, i - 1) : i + 1]
    raise ValueError(
        f"budget {budget} is not reachable with tie_mode={tie_mode!r} over {n} modules; "
        f"nearest reachable trainable counts: {nearest} (below {untied}: u=1 with tied groups; "
        f"multiples of {untied}: untied with u>1)"
    )
