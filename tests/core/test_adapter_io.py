"""Adapter files (few bytes, bit-exact, bound to their base) and the exact peft LoRA export."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import tiny_causal_lm
from tests.core.test_adapter import randomize_
from tinylora_verl import TinyLoRAConfig, inject_tinylora, load_adapter, read_adapter
from tinylora_verl.core.adapter_io import adapter_metadata


@pytest.mark.parametrize(
    "kwargs", [{"budget": 7}, {"u": 3, "tie_mode": "structured", "tie_size": 2}, {"v_dtype": "bfloat16", "tie_mode": "full", "u": 5}]
)
def test_round_trip_is_bit_exact(tmp_path, input_ids, kwargs):
    model = tiny_causal_lm()
    adapter = inject_tinylora(model, TinyLoRAConfig(**kwargs))
    randomize_(adapter, std=0.1)
    path = tmp_path / "adapter.safetensors"
    adapter.save_adapter(str(path))
    fresh = tiny_causal_lm()
    loaded = load_adapter(str(path), fresh)
    assert loaded.tie_plan == adapter.tie_plan and loaded.config == adapter.config
    for a, b in zip(adapter.vectors, loaded.vectors):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_file_is_a_few_hundred_bytes(tmp_path):
    adapter = inject_tinylora(tiny_causal_lm(), TinyLoRAConfig(budget=7))
    path = tmp_path / "a.safetensors"
    adapter.save_adapter(str(path))
    assert path.stat().st_size < 1024
    v, meta = read_adapter(str(path))
    assert v.shape == (7, 1) and meta["config"]["tie_size"] == 2 and meta["sign_convention"]


def test_loading_onto_another_base_is_refused(tmp_path):
    adapter = inject_tinylora(tiny_causal_lm(seed=0), TinyLoRAConfig())
    path = tmp_path / "a.safetensors"
    adapter.save_adapter(str(path))
    other = tiny_causal_lm(seed=1)
    with pytest.raises(ValueError, match=r"trained on a base whose target weights have fingerprint [0-9a-f]{16}; this model's are"):
        load_adapter(str(path), other)
    assert not any("tinylora" in n for n, _ in other.named_buffers()), "a refused load must leave the model clean"


def test_loading_onto_another_architecture_is_refused(tmp_path):
    adapter = inject_tinylora(tiny_causal_lm(layers=2), TinyLoRAConfig())
    path = tmp_path / "a.safetensors"
    adapter.save_adapter(str(path))
    with pytest.raises(ValueError, match=r"was trained on 14 modules .* this model gives 21"):
        load_adapter(str(path), tiny_causal_lm(layers=3))


def test_file_stores_only_what_gives_v_its_meaning(tmp_path):
    adapter = inject_tinylora(tiny_causal_lm(), TinyLoRAConfig(budget=7, cpu_kernel="off", hook_dtype="activation"))
    path = tmp_path / "a.safetensors"
    adapter.save_adapter(str(path))
    _, meta = read_adapter(str(path))
    assert set(meta["config"]) == {"r", "u", "tie_mode", "tie_size", "seed", "target_modules", "budget"}


def test_runtime_settings_belong_to_the_loading_machine(tmp_path, input_ids):
    """Saved with cpu_kernel='on' (a machine with g++), loaded with 'off' (one without): same logits."""
    model = tiny_causal_lm()
    adapter = inject_tinylora(model, TinyLoRAConfig(budget=7, cpu_kernel="on"))
    randomize_(adapter, std=0.1)
    path = tmp_path / "a.safetensors"
    adapter.save_adapter(str(path))
    loaded = load_adapter(str(path), tiny_causal_lm(), cpu_kernel="off")
    assert loaded.config.cpu_kernel == "off" and loaded.config.hook_dtype == "float32"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids).logits, model(input_ids).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\['seed'\] are not runtime settings; allowed: \['cpu_kernel', 'hook_dtype'\]"):
        load_adapter(str(path), tiny_causal_lm(), seed=3)


def test_files_that_stored_the_whole_config_keep_loading(tmp_path, input_ids):
    """Earlier files held every config field, runtime settings included (cpu_kernel 'on' among them)."""
    model = tiny_causal_lm()
    adapter = inject_tinylora(model, TinyLoRAConfig(budget=7))
    randomize_(adapter, std=0.1)
    v = torch.stack([p.detach() for p in adapter.vectors])
    meta = json.loads(adapter_metadata(adapter)["tinylora"])
    meta["config"] = dict(adapter.config.to_dict(), cpu_kernel="on", hook_dtype="activation")
    old = tmp_path / "old.safetensors"
    save_file({"v": v}, str(old), metadata={"format": "tinylora-v1", "tinylora": json.dumps(meta)})
    loaded = load_adapter(str(old), tiny_causal_lm())
    assert loaded.config.cpu_kernel == "auto" and loaded.config.hook_dtype == "float32"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="TinyLoRA adapter file not found"):
        load_adapter(str(tmp_path / "nope.safetensors"), tiny_causal_lm())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a TinyLoRA adapter file"):
        read_adapter(str(junk))
    other = tmp_path / "other.safetensors"
    save_file({"v": torch.zeros(1, 1)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"has format 'pt'; this version reads 'tinylora-v1'"):
        read_adapter(str(other))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_lora_export_matches_peft(tmp_path, input_ids, arch):
    from peft import PeftModel

    model = tiny_causal_lm(arch)
    base = copy.deepcopy(model)
    adapter = inject_tinylora(model, TinyLoRAConfig(u=2, tie_size=3))
    randomize_(adapter, std=0.5)
    adapter.export_lora(str(tmp_path / "lora"))
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 2 and cfg["peft_type"] == "LORA"
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "lora"))
    with torch.no_grad():
        ours, theirs = model(input_ids).logits, peft_model(input_ids).logits
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_out = plain(input_ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - base_out).abs().max() > 1e-3
    for name in adapter.module_names:
        B, A = adapter.lora_factors(name)
        torch.testing.assert_close(B @ A, adapter.delta_weight(name), rtol=1e-6, atol=1e-7)


def edited(path, **changes):
    """Rewrite the adapter file at ``path`` with config ``changes`` in its metadata, keeping the stored checksum."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, v = f.metadata(), f.get_tensor("v")
    info = json.loads(meta["tinylora"])
    info["config"].update(changes)
    meta["tinylora"] = json.dumps(info, sort_keys=True, separators=(",", ":"))
    save_file({"v": v}, str(path), metadata=meta)


@pytest.mark.parametrize("changes", [{"r": 1}, {"seed": 5}, {"tie_size": 3}])
def test_edited_metadata_fails_its_checksum(tmp_path, changes):
    adapter = inject_tinylora(tiny_causal_lm(), TinyLoRAConfig(budget=7))
    path = tmp_path / "a.safetensors"
    adapter.save_adapter(str(path))
    edited(path, **changes)
    with pytest.raises(ValueError, match=r"fails its checksum: its metadata or v was edited or damaged after it was "
                                         r"written"):
        load_adapter(str(path), tiny_causal_lm())


def test_files_without_a_checksum_load_with_a_warning(tmp_path):
    adapter = inject_tinylora(tiny_causal_lm(), TinyLoRAConfig(budget=7))
    path = tmp_path / "a.safetensors"
    adapter.save_adapter(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, v = f.metadata(), f.get_tensor("v")
    del meta["checksum"]
    save_file({"v": v}, str(path), metadata=meta)
    with pytest.warns(RuntimeWarning, match=r"has no checksum \(written before checksums\)"):
        load_adapter(str(path), tiny_causal_lm())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_v_is_refused_on_save_and_on_load(tmp_path, value):
    from tinylora_verl.core.adapter_io import checksum

    adapter = inject_tinylora(tiny_causal_lm(), TinyLoRAConfig(budget=7))
    with torch.no_grad():
        adapter.vectors[3].fill_(value)
    with pytest.raises(ValueError, match=r"refusing to save a TinyLoRA adapter .* 1 of v's 7 values are NaN or "
                                         r"infinite"):
        adapter.save_adapter(str(tmp_path / "a.safetensors"))
    # A file with a non-finite v and a consistent checksum (written by anything else) is refused when read.
    good = inject_tinylora(tiny_causal_lm(), TinyLoRAConfig(budget=7))
    meta = adapter_metadata(good)
    v = torch.zeros(7, 1)
    v[3, 0] = value
    meta["checksum"] = checksum(v, meta["tinylora"])
    save_file({"v": v}, str(tmp_path / "b.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"holds a non-finite v \(1 of 7 values are NaN or infinite\): refused"):
        load_adapter(str(tmp_path / "b.safetensors"), tiny_causal_lm())


def test_adapter_files_are_readable_like_other_checkpoint_files(tmp_path):
    adapter = inject_tinylora(tiny_causal_lm(), TinyLoRAConfig(budget=7))
    adapter.save_adapter(str(tmp_path / "a.safetensors"))
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644


def test_any_changed_target_weight_is_detected(tmp_path):
    """One element between the earlier strided sample's points: the full fingerprint changes, the sample does not;
    an adapter refuses a base with any changed target weight."""
    from tinylora_verl.core.fingerprint import SAMPLED, fingerprint

    big = {"proj": torch.nn.Linear(96, 128, bias=False)}  # 12288 elements: the sample reads every third
    full, sampled = fingerprint(big), fingerprint(big, SAMPLED)
    with torch.no_grad():
        big["proj"].weight.view(-1)[1] += 1e-3
    assert fingerprint(big, SAMPLED) == sampled and fingerprint(big) != full

    adapter = inject_tinylora(tiny_causal_lm(), TinyLoRAConfig(budget=7))
    adapter.save_adapter(str(tmp_path / "a.safetensors"))
    other = tiny_causal_lm()
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-4
    with pytest.raises(ValueError, match=r"this model's are [0-9a-f]{16} \(sha256-float32\)"):
        load_adapter(str(tmp_path / "a.safetensors"), other)
