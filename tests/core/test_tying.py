"""Tie plans and the budget planner, on module lists of real architectures built without weights."""

import pytest

from tests.conftest import CONFIGS
from tinylora_verl import DEFAULT_TARGET_MODULES, build_tie_plan, find_target_modules, plan_budget
from tinylora_verl.apps.models import load_config, meta_model
from tinylora_verl.core.tying import canonical_order


def module_names(config_file: str) -> list[str]:
    model = meta_model(load_config(str(CONFIGS / config_file)))
    return list(find_target_modules(model, DEFAULT_TARGET_MODULES))


@pytest.fixture(scope="module")
def qwen7b():
    return module_names("qwen2.5-7b-instruct.json")


def test_real_module_counts():
    assert len(module_names("qwen2.5-7b-instruct.json")) == 28 * 7
    assert len(module_names("qwen2.5-3b-instruct.json")) == 36 * 7
    assert len(module_names("qwen3-8b.json")) == 36 * 7
    assert len(module_names("smollm2-135m-instruct.json")) == 30 * 7


# (config, budget, u, modules per group, groups): the paper's Table 2 counts, worked back.
PLANS = [
    ("qwen2.5-7b-instruct.json", 13, 1, 16, 13),
    ("qwen2.5-7b-instruct.json", 49, 1, 4, 49),
    ("qwen2.5-7b-instruct.json", 196, 1, 1, 196),
    ("qwen2.5-7b-instruct.json", 392, 2, 1, 196),
    ("qwen2.5-7b-instruct.json", 6272, 32, 1, 196),
    ("qwen2.5-7b-instruct.json", 100352, 512, 1, 196),
    ("qwen2.5-7b-instruct.json", 1, 1, 196, 1),
    ("qwen2.5-3b-instruct.json", 16, 1, 16, 16),
    ("qwen2.5-3b-instruct.json", 63, 1, 4, 63),
    ("qwen2.5-3b-instruct.json", 8064, 32, 1, 252),
    ("qwen2.5-3b-instruct.json", 129024, 512, 1, 252),
    ("smollm2-135m-instruct.json", 13, 1, 17, 13),
    ("smollm2-135m-instruct.json", 105, 1, 2, 105),
]


@pytest.mark.parametrize("config, budget, u, tie_size, groups", PLANS)
def test_plan_budget_on_real_configs(config, budget, u, tie_size, groups):
    bp = plan_budget(module_names(config), budget)
    assert (bp.u, bp.tie_size, bp.num_groups, bp.num_params) == (u, tie_size, groups, budget)
    assert (bp.bytes_fp32, bp.bytes_bf16) == (4 * budget, 2 * budget)


def test_thirteen_parameters_is_26_bytes_in_bf16(qwen7b):
    bp = plan_budget(qwen7b, 13)
    plan = build_tie_plan(qwen7b, DEFAULT_TARGET_MODULES, "tiled", bp.tie_size, bp.u)
    assert plan.num_params == 13 and plan.bytes(2) == 26
    assert [len(g) for g in plan.groups] == [16] * 12 + [4]


@pytest.mark.parametrize("budget, nearest", [(200, r"\[196, 392\]"), (15, r"\[14, 16\]"), (97, r"\[66, 98\]"), (250, r"\[196, 392\]")])
def test_unreachable_budget_lists_nearest(qwen7b, budget, nearest):
    with pytest.raises(ValueError, match=rf"budget {budget} is not reachable .* 196 modules; nearest reachable trainable counts: {nearest}"):
        plan_budget(qwen7b, budget)


@pytest.mark.parametrize("budget", [0, -5, 2.5, True])
def test_bad_budget(qwen7b, budget):
    with pytest.raises(ValueError, match=r"`budget` should be an integer >= 1"):
        plan_budget(qwen7b, budget)


def test_no_modules_is_an_error():
    with pytest.raises(ValueError, match="plan_budget got no modules"):
        plan_budget([], 13)


def test_tiled_groups_are_layer_major_neighbours(qwen7b):
    plan = build_tie_plan(qwen7b, DEFAULT_TARGET_MODULES, "tiled", 16, 1)
    first = plan.groups[0]
    assert first[:7] == tuple(f"model.layers.0.{p}" for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"))
    assert first[7] == "model.layers.1.self_attn.q_proj" and first[-1] == "model.layers.2.self_attn.k_proj"


def test_structured_groups_hold_one_projection_type(qwen7b):
    plan = build_tie_plan(qwen7b, DEFAULT_TARGET_MODULES, "structured", 16, 1)
    assert len(plan.groups) == 7 * 2
    for g in plan.groups:
        assert len({n.rsplit(".", 1)[-1] for n in g}) == 1
    assert plan_budget(qwen7b, 14, "structured").tie_size == 14


@pytest.mark.parametrize("mode, groups", [("none", 196), ("full", 1)])
def test_none_and_full(qwen7b, mode, groups):
    plan = build_tie_plan(qwen7b, DEFAULT_TARGET_MODULES, mode, 16, 2)
    assert len(plan.groups) == groups and plan.num_params == 2 * groups


def test_order_does_not_depend_on_traversal(qwen7b):
    shuffled = list(reversed(qwen7b))
    a = build_tie_plan(qwen7b, DEFAULT_TARGET_MODULES, "tiled", 16, 1)
    b = build_tie_plan(shuffled, DEFAULT_TARGET_MODULES, "tiled", 16, 1)
    assert a == b


def test_layer_index_sorts_numerically():
    names = ["model.layers.10.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert canonical_order(names, ("up_proj",)) == [names[2], names[1], names[0]]


def test_plan_is_inspectable(qwen7b):
    plan = build_tie_plan(qwen7b, DEFAULT_TARGET_MODULES, "tiled", 16, 1)
    assert plan.group_of("model.layers.27.mlp.down_proj") == 12
    text = plan.describe()
    assert "trainable=13 (52 B fp32, 26 B bf16)" in text and text.count("\n") == 14
    with pytest.raises(KeyError, match="is in no tie group"):
        plan.group_of("lm_head")


def test_unknown_mode_and_empty_plan():
    with pytest.raises(ValueError, match=r"`tie_mode` should be one of .* got 'chunky'"):
        build_tie_plan(["a.q_proj"], ("q_proj",), "chunky", 1, 1)
    with pytest.raises(ValueError, match="zero modules"):
        build_tie_plan([], ("q_proj",), "tiled", 1, 1)
    with pytest.raises(ValueError, match="matches none of target_modules"):
        build_tie_plan(["a.w"], ("q_proj",), "tiled", 1, 1)
