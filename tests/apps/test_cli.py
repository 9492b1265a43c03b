"""The ``tinylora-verl`` command: plan, show, export (merged HF folder + exact LoRA)."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import CONFIGS, tiny_causal_lm
from tinylora_verl.apps.cli import main


def test_plan_qwen7b_13(capsys):
    assert main(["plan", "--model", str(CONFIGS / "qwen2.5-7b-instruct.json"), "--budget", "13"]) == 0
    out = capsys.readouterr().out
    assert "196 target modules" in out
    assert "budget 13: u=1, modules per group=16, groups=13, trainable=13 -> 52 bytes fp32 / 26 bytes bf16" in out
    assert out.count("model.layers.") == 26


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--budget", "15"], r"budget 15 is not reachable .* nearest reachable trainable counts: \[14, 16\]"),
        (["--budget", "13", "--target-modules", "c_attn"], r"match no nn.Linear in Qwen2ForCausalLM; its linear module suffixes are"),
    ],
)
def test_plan_errors(capsys, argv, msg):
    assert main(["plan", "--model", str(CONFIGS / "qwen2.5-7b-instruct.json"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinylora-verl plan: error: ")
    import re

    assert re.search(msg, err), err


def test_plan_missing_model(capsys, tmp_path):
    assert main(["plan", "--model", str(tmp_path / "nowhere"), "--budget", "13"]) == 2
    assert "is neither a config.json file nor a folder with one" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "tinylora_verl.apps.cli", "--help"], capture_output=True, text=True, check=True)
    assert "plan" in out.stdout and "export" in out.stdout


@pytest.fixture
def trained(tiny_trained):
    tmp, model, _ = tiny_trained
    return tmp, model


def test_show(capsys, trained):
    tmp, _ = trained
    assert main(["show", str(tmp / "adapter.safetensors")]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert len(meta["v"]) == 7 and meta["file_bytes"] < 1024 and meta["config"]["budget"] == 7


def test_show_reports_a_damaged_file_in_standard_json(capsys, trained):
    """A NaN in v: shown by name in standard JSON (no bare NaN), listed among the problems, exit status 1."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tinylora_verl.core.adapter_io import checksum

    tmp, _ = trained
    path = tmp / "adapter.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, v = f.metadata(), f.get_tensor("v")
    v[2, 0] = float("nan")
    meta["checksum"] = checksum(v, meta["tinylora"])
    save_file({"v": v}, str(path), metadata=meta)
    assert main(["show", str(path)]) == 1
    out = capsys.readouterr().out
    shown = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert shown["v"][2] == ["nan"] and shown["problems"] == ["1 of v's 7 values are NaN or infinite"]


def test_export_refuses_a_non_empty_folder_and_overwrite_leaves_nothing_stale(capsys, trained):
    tmp, _ = trained
    out = tmp / "merged"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text("{}")
    (out / "model-00002-of-00002.safetensors").write_bytes(b"old shard")
    argv = ["export", "--model", str(tmp / "base"), "--adapter", str(tmp / "adapter.safetensors"), "--out", str(out)]
    assert main(argv) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors") and "token" not in p.name) \
        == ["config.json", "generation_config.json", "model.safetensors"]
    assert not [p for p in tmp.iterdir() if p.name.startswith(".merged")], "no temporary folder is left behind"


def test_export_merged_and_lora(capsys, trained, input_ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, hooked = trained
    argv = ["export", "--model", str(tmp / "base"), "--adapter", str(tmp / "adapter.safetensors"),
            "--out", str(tmp / "merged"), "--lora-out", str(tmp / "lora"), "--dtype", "float32"]
    assert main(argv) == 0
    assert "merge fidelity 1.0000" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(str(tmp / "merged"), dtype=torch.float32)
    merged.config._attn_implementation = "eager"
    base = AutoModelForCausalLM.from_pretrained(str(tmp / "base"), dtype=torch.float32)
    base.config._attn_implementation = "eager"
    with torch.no_grad():
        ref = hooked(input_ids).logits
        torch.testing.assert_close(merged(input_ids).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(PeftModel.from_pretrained(base, str(tmp / "lora"))(input_ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_export_onto_wrong_base(capsys, trained):
    tmp, _ = trained
    tiny_causal_lm(seed=3).save_pretrained(str(tmp / "other"))
    argv = ["export", "--model", str(tmp / "other"), "--adapter", str(tmp / "adapter.safetensors"), "--out", str(tmp / "m")]
    assert main(argv) == 2
    assert "fingerprint" in capsys.readouterr().err


def test_data_subcommand_writes_parquet(tmp_path, capsys):
    import pandas as pd

    from tinylora_verl.tasks.data import GSM8K_SLICE_DIR

    assert main(["data", "gsm8k", "--src", str(GSM8K_SLICE_DIR), "--out-dir", str(tmp_path), "--limit", "3",
                 "--splits", "test", "--prompt-style", "oneshot"]) == 0
    df = pd.read_parquet(tmp_path / "test.parquet")
    assert len(df) == 3 and len(df.prompt[0]) == 3 and df.data_source[0] == "openai/gsm8k"
