"""TinyLoRA's FSDP engine built by verl's own registry on a tiny model (FSDP2 over gloo, CPU platform on)."""

import copy

import pytest
import torch

from tests.verl import harness

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    harness.activate_cpu()
    harness.init_single_process()
    return harness.save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def engine(model_dir):
    return harness.build_engine(model_dir, {"enable": True, "budget": 7, "init": "normal", "init_std": 0.05})


def reference(model_dir, engine):
    """The core applied to a plain float32 copy of the same base, with the engine's v."""
    from transformers import AutoModelForCausalLM

    from tinylora_verl import TinyLoRAConfig, inject_tinylora

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base.config._attn_implementation = "eager"
    adapter = inject_tinylora(base, TinyLoRAConfig(budget=7))
    with torch.no_grad():
        for ours, theirs in zip(adapter.vectors, engine.tl_adapter.vectors):
            ours.copy_(theirs)
    return base, adapter


def test_registry_resolves_to_tinylora(engine):
    from tinylora_verl.verl.engine import TinyLoRAFSDPEngine

    assert type(engine) is TinyLoRAFSDPEngine and engine.tinylora_enabled
    assert engine.tl_adapter.num_trainable == 7
    assert [g["params"] for g in engine.optimizer.param_groups][0] == list(engine.tl_adapter.parameters())
    assert all(not p.requires_grad for p in engine.module.parameters())


@pytest.mark.parametrize("sync_dtype", ["bfloat16", "float32"])
def test_stream_has_base_names_and_merged_values(model_dir, sync_dtype):
    engine = harness.build_engine(model_dir, {"enable": True, "budget": 7, "init": "normal", "init_std": 0.05,
                                              "sync_dtype": sync_dtype})
    base, adapter = reference(model_dir, engine)
    stream, peft_config = engine.get_per_tensor_param()
    got = dict(stream)
    assert peft_config is None
    assert list(got) == list(base.state_dict())
    expected = dict(adapter.merged_named_tensors(dtype=getattr(torch, sync_dtype)))
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name
    assert engine.tl_last_sync.merged == 14 and engine.tl_last_sync.bytes > 0


@pytest.mark.parametrize("sync_dtype, tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_lora_sync_streams_the_exact_lora_then_base_on_request(model_dir, sync_dtype, tol):
    """sync_mode=lora: peft names and config, B A = ΔW, and served through peft it gives the adapted model."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    engine = harness.build_engine(model_dir, {"enable": True, "budget": 7, "init": "normal", "init_std": 0.3,
                                              "sync_mode": "lora", "sync_dtype": sync_dtype}, lora_extra={"rank": 2})
    base, adapter = reference(model_dir, engine)
    stream, peft_config = engine.get_per_tensor_param(base_sync_done=True)
    lora = dict(stream)
    assert peft_config["r"] == 2 and peft_config["lora_alpha"] == 2
    assert peft_config["target_modules"] == sorted(adapter.module_names)
    assert len(lora) == 2 * 14 and all(t.dtype == getattr(torch, sync_dtype) for t in lora.values())
    for name in adapter.module_names:
        A, B = (lora[f"base_model.model.{name}.lora_{x}.weight"].float() for x in "AB")
        torch.testing.assert_close(B @ A, adapter.delta_weight(name), rtol=tol, atol=tol * 1e-2)
    sync = engine.tl_last_sync
    assert sync.merged == 14 and sync.bytes == sum(t.numel() * t.element_size() for t in lora.values())
    assert abs(sync.fidelity - 1) < (1e-6 if sync_dtype == "float32" else 1e-2)
    # An independent consumer: peft loads the stream onto a fresh copy of the base.
    fresh = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    fresh.config._attn_implementation = "eager"
    keys = ("r", "lora_alpha", "lora_dropout", "bias", "target_modules")
    served = get_peft_model(fresh, LoraConfig(**{k: peft_config[k] for k in keys}))
    missing = set_peft_model_state_dict(served, {k: v.float() for k, v in lora.items()}).unexpected_keys
    assert not missing, missing[:3]
    ids = harness.batch()
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, base(input_ids=ids).logits, rtol=tol, atol=tol)
    # The one base sync verl asks for when vLLM started from dummy weights: pristine W under HF names.
    stream, peft_config = engine.get_per_tensor_param(base_sync_done=False)
    got = dict(stream)
    assert peft_config is not None and list(got) == list(base.state_dict())
    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).state_dict()
    for name, tensor in got.items():
        assert torch.equal(tensor, plain[name].to(getattr(torch, sync_dtype))), name


def test_hooked_forward_matches_core(model_dir, engine):
    base, _ = reference(model_dir, engine)
    ids = harness.batch()
    with torch.no_grad():
        torch.testing.assert_close(engine.module(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_step_moves_only_v_and_reports_metrics(engine):
    before = [p.detach().clone() for p in engine.tl_adapter.parameters()]
    frozen = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    engine.optimizer_zero_grad()
    harness.loss_of(engine.module, harness.batch()).backward()
    norm = engine.optimizer_step()
    assert norm > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.tl_adapter.parameters()))
    assert all(torch.equal(v, engine.module.state_dict()[k]) for k, v in frozen.items())
    metrics = engine.tinylora_metrics()
    assert {"tinylora/v_norm", "tinylora/v_0", "tinylora/v_6"} <= set(metrics)
    assert 0.05 < metrics["perf/peak_rss_gb"] < 24  # this test process, in GiB


def test_non_finite_step_is_skipped(engine, caplog):
    before = [p.detach().clone() for p in engine.tl_adapter.parameters()]
    for p in engine.tl_adapter.parameters():
        p.grad = torch.full_like(p, float("nan"))
    norm = engine.optimizer_step()
    assert norm != norm
    assert all(torch.equal(a, b) for a, b in zip(before, engine.tl_adapter.parameters()))
    assert "skipping this optimizer step" in caplog.text


def test_too_many_non_finite_steps_in_a_row_stop_the_run(model_dir):
    """A finite step resets the count; max_nonfinite_steps in a row stop with v still the last finite one."""
    engine = harness.build_engine(model_dir, {"enable": True, "budget": 7, "init": "normal", "init_std": 0.05,
                                              "max_nonfinite_steps": 2})
    good = [p.detach().clone() for p in engine.tl_adapter.parameters()]

    def step(value):
        for p in engine.tl_adapter.parameters():
            p.grad = torch.full_like(p, value)
        return engine.optimizer_step()

    step(float("nan"))
    step(0.1)  # finite: the count starts again
    good = [p.detach().clone() for p in engine.tl_adapter.parameters()]
    step(float("inf"))
    with pytest.raises(RuntimeError, match=r"2 optimizer steps in a row had a non-finite gradient or update \(limit "
                                           r"tinylora.max_nonfinite_steps=2\); stopping"):
        step(float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(good, engine.tl_adapter.parameters()))


def test_a_finite_gradient_whose_update_is_not_finite_is_undone(model_dir):
    engine = harness.build_engine(model_dir, {"enable": True, "budget": 7, "init": "normal", "init_std": 0.05})
    before = [p.detach().clone() for p in engine.tl_adapter.parameters()]
    for group in engine.optimizer.param_groups:
        group["lr"] = float("inf")
    for p in engine.tl_adapter.parameters():
        p.grad = torch.full_like(p, 0.1)
    engine.optimizer_step()
    assert engine.tl_nonfinite_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, engine.tl_adapter.parameters()))


def test_resume_refuses_a_non_finite_checkpoint(tmp_path, model_dir, engine):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tinylora_verl.core.adapter_io import checksum

    engine.save_checkpoint(str(tmp_path / "actor"), global_step=1)
    path = tmp_path / "actor" / "tinylora_adapter.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, v = f.metadata(), f.get_tensor("v")
    v[1, 0] = float("nan")
    meta["checksum"] = checksum(v, meta["tinylora"])
    save_file({"v": v}, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"holds a non-finite v \(1 of 7 values are NaN or infinite\): refused"):
        engine.load_checkpoint(str(tmp_path / "actor"))


def test_checkpoint_round_trip(tmp_path, model_dir, engine):
    for _ in range(2):
        engine.optimizer_zero_grad()
        harness.loss_of(engine.module, harness.batch()).backward()
        engine.optimizer_step()
    engine.save_checkpoint(str(tmp_path / "actor"), global_step=2)
    files = {p.name: p.stat().st_size for p in (tmp_path / "actor").iterdir()}
    assert files["tinylora_adapter.safetensors"] < 4096 and "tinylora_state_rank_0.pt" in files
    fresh = harness.build_engine(model_dir, {"enable": True, "budget": 7, "init": "normal", "init_std": 0.05})
    fresh.load_checkpoint(str(tmp_path / "actor"))
    assert all(torch.equal(a, b) for a, b in zip(engine.tl_adapter.parameters(), fresh.tl_adapter.parameters()))
    s0, s1 = engine.optimizer.state_dict(), fresh.optimizer.state_dict()
    for k in s0["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s0["state"][k][name], s1["state"][k][name])
    # and the next step is the same in both
    for e in (engine, fresh):
        e.optimizer_zero_grad()
        harness.loss_of(e.module, harness.batch(seed=9)).backward()
        e.optimizer_step()
    assert all(torch.equal(a, b) for a, b in zip(engine.tl_adapter.parameters(), fresh.tl_adapter.parameters()))


def test_checkpoint_restores_every_generator(tmp_path, engine):
    """torch CPU (and CUDA where present), numpy and Python's random continue as if the run had not stopped."""
    import random

    import numpy as np

    engine.save_checkpoint(str(tmp_path / "global_step_1" / "actor"), global_step=1)
    draws = (torch.rand(3), np.random.rand(3), random.random())
    state = torch.load(tmp_path / "global_step_1" / "actor" / "tinylora_state_rank_0.pt", weights_only=False)
    assert set(state["rng"]) == {"cpu", "cuda", "numpy", "random"}
    assert (state["rng"]["cuda"] is None) == (not torch.cuda.is_available())
    engine.load_checkpoint(str(tmp_path / "global_step_1" / "actor"))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]


def test_checkpoint_of_an_earlier_version_restores_its_cpu_generator(tmp_path, engine):
    path = tmp_path / "global_step_1" / "actor"
    engine.save_checkpoint(str(path), global_step=1)
    state_file = path / "tinylora_state_rank_0.pt"
    state = torch.load(state_file, weights_only=False)
    state["cpu_rng"] = state.pop("rng")["cpu"]
    torch.save(state, state_file)
    first = torch.rand(2)
    engine.load_checkpoint(str(path))
    assert torch.equal(torch.rand(2), first)


@pytest.mark.parametrize("keep, left", [(None, [1, 2, 3, 4]), (0, [1, 2, 3, 4]), (2, [3, 4]), (1, [4])])
def test_max_ckpt_to_keep_is_honoured(tmp_path, engine, keep, left):
    """verl passes trainer.max_actor_ckpt_to_keep; older actor checkpoints beyond it go once a new one is written."""
    (tmp_path / "global_step_0" / "actor").mkdir(parents=True)  # not a TinyLoRA checkpoint: never removed
    for step in (1, 2, 3, 4):
        engine.save_checkpoint(str(tmp_path / f"global_step_{step}" / "actor"), global_step=step,
                               max_ckpt_to_keep=keep)
    kept = sorted(int(p.parent.parent.name.split("_")[-1]) for p in tmp_path.glob("global_step_*/actor/*.safetensors"))
    assert kept == left and (tmp_path / "global_step_0" / "actor").is_dir()


def test_injection_uses_every_core_the_process_may_run_on(model_dir, monkeypatch):
    """Ray starts actors with OMP_NUM_THREADS=1; a CPU rank's SVDs take all of its cores, a GPU rank's its GPU."""
    from tinylora_verl.verl import engine as engine_module

    seen, inject = {}, engine_module.inject_tinylora

    def spy(module, config, **kwargs):
        seen.update(kwargs)
        return inject(module, config, **kwargs)

    monkeypatch.setattr(engine_module, "inject_tinylora", spy)
    monkeypatch.setattr(engine_module, "available_cpus", lambda: 3)
    harness.build_engine(model_dir, {"enable": True, "budget": 7})
    assert seen == {"device": None, "threads": 3}


def test_checkpoint_with_another_config_is_refused(tmp_path, model_dir, engine):
    engine.save_checkpoint(str(tmp_path / "actor"))
    other = harness.build_engine(model_dir, {"enable": True, "budget": 7, "seed": 3})
    with pytest.raises(ValueError, match=r"saved with a different TinyLoRA config \(seed: saved 0 vs 3\)"):
        other.load_checkpoint(str(tmp_path / "actor"))


def test_disabled_engine_is_the_stock_engine(model_dir):
    for tinylora in (None, {"enable": False}):
        e = harness.build_engine(model_dir, tinylora)
        assert not e.tinylora_enabled and e.tl_adapter is None
        assert not any("tinylora" in n for n, _ in e.module.named_buffers())
        assert any(p.requires_grad for p in e.module.parameters())


def test_forward_only_engine_never_gets_the_adapter(model_dir):
    """The reference engine (forward_only) shares the registered class and must stay plain."""
    # Not initialized: verl's forward-only FSDP2 path pins CPU-offloaded memory, which needs an accelerator.
    e = harness.build_engine(model_dir, {"enable": True}, forward_only=True, initialize=False)
    assert not e.tinylora_enabled


def test_disable_adapter_gives_the_base(model_dir, engine):
    plain = harness.build_engine(model_dir, None)
    ids = harness.batch()
    with torch.no_grad(), engine.disable_adapter():
        torch.testing.assert_close(engine.module(input_ids=ids).logits, plain.module(input_ids=ids).logits, rtol=0, atol=0)
    with torch.no_grad():
        assert (engine.module(input_ids=ids).logits - plain.module(input_ids=ids).logits).abs().max() > 1e-4


def test_bypassing_sync_paths_are_refused(engine):
    with pytest.raises(NotImplementedError, match="sharded sync .* would send unmerged base shards"):
        engine.get_per_tensor_param_shard()
    with pytest.raises(NotImplementedError, match="delta-sharded sync would send unmerged"):
        engine.get_per_tensor_param_delta_shard()


@pytest.mark.parametrize(
    "model_kw, tinylora, msg",
    [
        ({"lora_rank": 8}, {"enable": True}, r"TinyLoRA and verl's PEFT LoRA are both enabled \(model.lora_rank=8\)"),
        ({"lora_extra": {"rank": 8}}, {"enable": True}, r"model.lora.rank=8 would make vLLM serve a LoRA that "
                                                         r"sync_mode=merged never sends"),
        ({}, {"enable": True, "sync_mode": "lora"}, r"sync_mode=lora needs actor_rollout_ref.model.lora.rank >= r=2"
                                                    r" \(vLLM's LoRA slot\), got 0"),
        ({"lora_extra": {"rank": 1}}, {"enable": True, "sync_mode": "lora"}, r"lora.rank >= r=2 .*got 1"),
        ({"lora_extra": {"rank": 2, "merge": True}}, {"enable": True, "sync_mode": "lora"},
         r"model.lora.merge=true would ask verl to merge it"),
        ({}, {"enable": True, "sync_mode": "delta"}, r"`tinylora.sync_mode` should be one of \['merged', 'lora', 'native'\]"),
        ({"lora_adapter_path": "/some/peft"}, {"enable": True}, r"model.lora_adapter_path='/some/peft' would be ignored"),
        ({}, {"enable": True, "sync_dtype": "int8"}, r"`tinylora.sync_dtype` should be one of \['bfloat16', 'float16', 'float32'\]"),
        ({}, {"enable": True, "rank": 2}, r"Unknown TinyLoRA config keys \['rank'\]"),
    ],
)
def test_bad_engine_configs(model_dir, model_kw, tinylora, msg):
    with pytest.raises(ValueError, match=msg):
        harness.build_engine(model_dir, tinylora, **model_kw)


def test_two_gloo_ranks_average_v_grad_like_one_process(tmp_path, model_dir):
    """2 ranks x half a batch, v's gradient averaged in optimizer_step == one process on the whole batch."""
    import torch.multiprocessing as mp

    out = tmp_path / "grads.pt"
    mp.spawn(harness.gloo_rank_main, args=(2, str(model_dir), 29555, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    engine = harness.build_engine(model_dir, {"enable": True, "budget": 7, "init": "normal", "init_std": 0.05})
    engine.optimizer_zero_grad()
    harness.loss_of(engine.module, harness.batch()).backward()
    expected = [p.grad.clone() for p in engine.tl_adapter.parameters()]
    norm = engine.optimizer_step()
    for a, b in zip(got["grads"], expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert abs(got["norm"] - norm) < 1e-5 * max(norm, 1)
