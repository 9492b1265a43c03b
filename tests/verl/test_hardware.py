"""Recipe = paper + hardware: an overlay (``+hardware=NAME``) changes only where a recipe runs, never what it does.

Each check composes a recipe with and without an overlay exactly as ``main_ppo`` does, resolves both, and compares
every leaf key. The keys an overlay may change are listed here one by one; anything else it changes (an algorithm,
loss, rollout-correction, reward, data-file or TinyLoRA key) fails the test with its name.
"""

import pytest
from omegaconf import OmegaConf

from tests.verl.test_recipes import compose

# Every key a hardware overlay may change: platform and placement, model path, kernels, lengths, batch and micro-batch
# sizes, step count and schedule, engine memory, output folder. Keys marked "derived" follow from another key
# through verl's own interpolations.
HARDWARE_KEYS = {
    # placement and platform
    "trainer.device", "trainer.n_gpus_per_node", "trainer.nnodes", "actor_rollout_ref.rollout.n_gpus_per_node",
    "data.dataloader_num_workers", "reward.num_workers", "actor_rollout_ref.rollout.agent.num_workers",
    "transfer_queue.backend.SimpleStorage.num_data_storage_units",
    "ray_kwargs.ray_init.num_cpus", "ray_kwargs.ray_init.num_gpus",
    "ray_kwargs.ray_init.runtime_env.env_vars.OMP_NUM_THREADS",
    "ray_kwargs.ray_init.runtime_env.env_vars.TINYLORA_VERL_CPU",
    "ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES",
    "ray_kwargs.ray_init.runtime_env.env_vars.VLLM_CPU_KVCACHE_SPACE",
    "ray_kwargs.ray_init.runtime_env.env_vars.VLLM_CPU_OMP_THREADS_BIND",
    # the model that fits, and the kernels the hardware has
    "actor_rollout_ref.model.path", "actor_rollout_ref.rollout.prometheus.served_model_name",  # derived
    "actor_rollout_ref.model.override_config.attn_implementation", "actor_rollout_ref.model.use_remove_padding",
    "actor_rollout_ref.actor.use_remove_padding",  # derived
    "actor_rollout_ref.model.enable_gradient_checkpointing",
    "actor_rollout_ref.actor.use_torch_compile", "actor_rollout_ref.ref.use_torch_compile",  # derived
    "actor_rollout_ref.rollout.enforce_eager",
    # lengths
    "data.max_prompt_length", "data.max_response_length",
    "actor_rollout_ref.rollout.prompt_length", "actor_rollout_ref.rollout.response_length",  # derived
    "distillation.teacher_models.teacher_model.inference.prompt_length",  # derived
    "distillation.teacher_models.teacher_model.inference.response_length",  # derived
    # batch and micro-batch sizes (the mini-batches per batch stay the recipe's)
    "data.train_batch_size", "actor_rollout_ref.actor.ppo_mini_batch_size", "critic.ppo_mini_batch_size",  # derived
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu",  # derived
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu",  # derived
    # step count and schedule
    "trainer.total_training_steps", "trainer.total_epochs", "trainer.save_freq", "trainer.test_freq",
    "trainer.val_before_train",
    # precision the hardware computes fast (bf16 only with native bf16 matrix instructions on a CPU)
    "actor_rollout_ref.actor.fsdp_config.model_dtype", "actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype",
    "actor_rollout_ref.actor.fsdp_config.mixed_precision.reduce_dtype",
    "actor_rollout_ref.actor.fsdp_config.mixed_precision.buffer_dtype", "actor_rollout_ref.rollout.dtype",
    "distillation.teacher_models.teacher_model.inference.dtype",  # derived
    # engine memory
    "actor_rollout_ref.rollout.gpu_memory_utilization", "actor_rollout_ref.rollout.enable_sleep_mode",
    "actor_rollout_ref.rollout.free_cache_engine", "actor_rollout_ref.rollout.max_num_seqs",
    "actor_rollout_ref.rollout.tensor_model_parallel_size",
    "actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes",
    # where outputs go
    "trainer.default_local_dir",
}

# What the paper fixes, named in the failure message when an overlay touches it: a key, or everything under a section.
PROTECTED = (
    "algorithm", "tinylora", "actor_rollout_ref.model.lora", "actor_rollout_ref.model.external_lib",
    "actor_rollout_ref.actor.policy_loss", "actor_rollout_ref.actor.clip_ratio",
    "actor_rollout_ref.actor.clip_ratio_low", "actor_rollout_ref.actor.clip_ratio_high",
    "actor_rollout_ref.actor.clip_ratio_c", "actor_rollout_ref.actor.loss_agg_mode",
    "actor_rollout_ref.actor.use_kl_loss", "actor_rollout_ref.actor.kl_loss_coef", "actor_rollout_ref.actor.kl_loss_type",
    "actor_rollout_ref.actor.entropy_coeff", "actor_rollout_ref.actor.optim", "actor_rollout_ref.rollout.n",
    "actor_rollout_ref.rollout.temperature", "actor_rollout_ref.rollout.calculate_log_probs", "data.train_files",
    "data.val_files", "reward.custom_reward_function",
)

# The CPU overlay over the paper's GSM8K recipe changes exactly these (the lengths it sets equal to the recipe's,
# such as the 512-token prompt, do not show; nor does bf16 where the CPU computes it natively).
PRECISION_KEYS = {"actor_rollout_ref.actor.fsdp_config.model_dtype", "actor_rollout_ref.rollout.dtype",
                  "distillation.teacher_models.teacher_model.inference.dtype"}
CPU_OVER_GSM8K = HARDWARE_KEYS - PRECISION_KEYS - {
    "data.max_prompt_length", "actor_rollout_ref.rollout.prompt_length",
    "distillation.teacher_models.teacher_model.inference.prompt_length", "trainer.nnodes",
    "actor_rollout_ref.rollout.tensor_model_parallel_size",
}

# The demo's own settings on top of `+recipe=tinylora_gsm8k +hardware=cpu` (each marked DEMO in the recipe), and the
# run name with what derives from it.
DEMO_KEYS = {
    "tinylora.lr", "actor_rollout_ref.actor.optim.lr", "data.train_files", "data.val_files",
    "reward.custom_reward_function.reward_kwargs.format_score",
    "trainer.experiment_name", "actor_rollout_ref.rollout.trace.experiment_name", "trainer.default_local_dir",
    "trainer.rollout_data_dir",
}
RUN_NAME_KEYS = {"trainer.experiment_name", "actor_rollout_ref.rollout.trace.experiment_name", "trainer.default_local_dir"}


def leaves(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def changed_keys(base: tuple[str, ...], other: tuple[str, ...]) -> set[str]:
    """Leaf keys whose resolved values differ between two compositions (added or removed keys included)."""
    a = leaves(OmegaConf.to_container(compose(*base), resolve=True))
    b = leaves(OmegaConf.to_container(compose(*other), resolve=True))
    missing = object()
    return {k for k in set(a) | set(b) if a.get(k, missing) != b.get(k, missing)}


def assert_hardware_only(changed: set[str], allowed: set[str] = HARDWARE_KEYS) -> None:
    protected = sorted(k for k in changed if any(k == p or k.startswith(p + ".") for p in PROTECTED))
    assert not protected, f"the overlay changes what the paper fixes: {protected}"
    unknown = sorted(changed - allowed)
    assert not unknown, f"the overlay changes keys not listed as hardware-bound: {unknown}"


@pytest.mark.parametrize("recipe", ["tinylora_gsm8k", "tinylora_math", "tinylora_gsm8k_1gpu"])
def test_cpu_overlay_changes_only_hardware_keys(recipe):
    assert_hardware_only(changed_keys((f"+recipe={recipe}",), (f"+recipe={recipe}", "+hardware=cpu")))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cpu_overlay_over_the_gsm8k_recipe_changes_exactly_the_listed_keys(dtype, monkeypatch):
    monkeypatch.setenv("TINYLORA_VERL_CPU_DTYPE", dtype)
    expected = CPU_OVER_GSM8K | (PRECISION_KEYS if dtype == "float32" else set())
    assert changed_keys(("+recipe=tinylora_gsm8k",), ("+recipe=tinylora_gsm8k", "+hardware=cpu")) == expected


@pytest.mark.parametrize("flags, dtype", [({"avx2", "avx512f"}, "float32"), ({"avx512f", "avx512_bf16"}, "bfloat16"),
                                          ({"amx_bf16", "amx_tile"}, "bfloat16"), (set(), "float32")])
def test_cpu_overlay_computes_in_bf16_only_where_the_cpu_has_bf16_instructions(flags, dtype, monkeypatch):
    from tinylora_verl.verl.cpu import precision

    monkeypatch.delenv("TINYLORA_VERL_CPU_DTYPE", raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    cfg = compose("+recipe=tinylora_gsm8k", "+hardware=cpu")
    a = cfg.actor_rollout_ref
    assert (a.actor.fsdp_config.model_dtype, a.actor.fsdp_config.mixed_precision.param_dtype, a.rollout.dtype) == (
        dtype, dtype, dtype)


def test_forced_cpu_dtype_is_validated(monkeypatch):
    from tinylora_verl.verl.cpu import precision

    monkeypatch.setenv("TINYLORA_VERL_CPU_DTYPE", "fp8")
    with pytest.raises(ValueError, match=r"TINYLORA_VERL_CPU_DTYPE='fp8' is not allowed; use one of "
                                         r"\['bfloat16', 'float32'\]"):
        precision.cpu_dtype()


def test_gpu1_overlay_changes_only_hardware_keys():
    changed = changed_keys(("+recipe=tinylora_gsm8k",), ("+recipe=tinylora_gsm8k", "+hardware=gpu1_24gb"))
    assert_hardware_only(changed)
    assert "actor_rollout_ref.model.path" in changed


def test_one_gpu_recipe_is_the_paper_recipe_on_other_hardware():
    assert_hardware_only(changed_keys(("+recipe=tinylora_gsm8k",), ("+recipe=tinylora_gsm8k_1gpu",)),
                         HARDWARE_KEYS | RUN_NAME_KEYS)


def test_demo_recipe_adds_only_its_documented_settings():
    changed = changed_keys(("+recipe=tinylora_gsm8k", "+hardware=cpu"), ("+recipe=tinylora_gsm8k_cpu",))
    assert changed == DEMO_KEYS


# The CPU study's GRPO arm on top of `+recipe=tinylora_gsm8k +hardware=cpu`: its data, batch, length, rate, run
# length and bookkeeping; the algorithm, reward and adapter stay the paper's.
ARITHMETIC_KEYS = {
    "tinylora.lr", "actor_rollout_ref.actor.optim.lr", "data.train_files", "data.val_files",
    "data.train_batch_size", "actor_rollout_ref.actor.ppo_mini_batch_size", "critic.ppo_mini_batch_size",
    "trainer.total_training_steps", "trainer.save_freq", "trainer.rollout_data_dir",
    *RUN_NAME_KEYS,
}


def test_study_recipe_changes_only_data_batches_rate_and_length():
    changed = changed_keys(("+recipe=tinylora_gsm8k", "+hardware=cpu"), ("+recipe=tinylora_arithmetic_cpu",))
    assert changed == ARITHMETIC_KEYS


@pytest.mark.parametrize("extra, key", [
    ("algorithm.rollout_correction.rollout_is_threshold=3.0", "algorithm.rollout_correction.rollout_is_threshold"),
    ("actor_rollout_ref.model.lora.tinylora.tie_mode=none", "actor_rollout_ref.model.lora.tinylora.tie_mode"),
    ("actor_rollout_ref.rollout.n=8", "actor_rollout_ref.rollout.n"),
    ("data.train_files=/elsewhere.parquet", "data.train_files"),
])
def test_the_check_names_a_non_hardware_change(extra, key):
    changed = changed_keys(("+recipe=tinylora_gsm8k",), ("+recipe=tinylora_gsm8k", "+hardware=cpu", extra))
    with pytest.raises(AssertionError, match=f"what the paper fixes: .*{key}"):
        assert_hardware_only(changed)


def test_an_unlisted_key_fails_too():
    changed = changed_keys(("+recipe=tinylora_gsm8k",), ("+recipe=tinylora_gsm8k", "+hardware=cpu",
                                                         "actor_rollout_ref.rollout.top_k=5"))
    with pytest.raises(AssertionError, match=r"not listed as hardware-bound: \['actor_rollout_ref.rollout.top_k'\]"):
        assert_hardware_only(changed)


# ---------------------------------------------------------------------------------------------- SFT overlay

# The SFT trainer's hardware-bound keys (its config tree: model / engine / optim / data / trainer).
SFT_HARDWARE_KEYS = {
    "trainer.device", "trainer.n_gpus_per_node", "trainer.nnodes", "data.num_workers", "data.val_max_samples",
    "model.path", "model.override_config.attn_implementation", "model.use_remove_padding",
    "model.enable_gradient_checkpointing", "engine.use_torch_compile",
    "data.max_length", "data.train_batch_size", "data.micro_batch_size_per_gpu", "data.use_dynamic_bsz",
    "trainer.total_training_steps", "trainer.total_epochs", "trainer.save_freq", "trainer.test_freq",
    "engine.model_dtype", "engine.mixed_precision.param_dtype", "engine.mixed_precision.reduce_dtype",
    "engine.mixed_precision.buffer_dtype",
    "trainer.default_local_dir",
}
SFT_PROTECTED = ("tinylora", "model.lora", "model.external_lib", "optim", "data.train_files", "data.val_files",
                 "data.messages_key", "engine.strategy")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cpu_sft_overlay_changes_only_hardware_keys(dtype, monkeypatch):
    from tests.verl.test_recipes import compose_sft

    monkeypatch.setenv("TINYLORA_VERL_CPU_DTYPE", dtype)
    a = leaves(OmegaConf.to_container(compose_sft("+recipe=tinylora_gsm8k_sft"), resolve=True))
    b = leaves(OmegaConf.to_container(compose_sft("+recipe=tinylora_gsm8k_sft", "+hardware=cpu_sft"), resolve=True))
    missing = object()
    changed = {k for k in set(a) | set(b) if a.get(k, missing) != b.get(k, missing)}
    protected = sorted(k for k in changed if any(k == p or k.startswith(p + ".") for p in SFT_PROTECTED))
    assert not protected, f"the overlay changes what the recipe fixes: {protected}"
    assert not sorted(changed - SFT_HARDWARE_KEYS), f"unlisted keys: {sorted(changed - SFT_HARDWARE_KEYS)}"
    assert "model.path" in changed and "trainer.device" in changed
