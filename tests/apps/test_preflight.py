"""Driver-side checks: a bad configuration stops before Ray starts, with one paragraph naming the problem."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import save_tiny_model
from tinylora_verl.apps.preflight import Preflight, check_run, model_config_json

ROOT = Path(__file__).resolve().parents[2]


def run_cfg(model_dir: Path, tmp_path: Path, **tinylora) -> dict:
    data = tmp_path / "train.parquet"
    data.write_bytes(b"")
    block = {"enable": True, "budget": 7} | tinylora
    return {"actor_rollout_ref": {"model": {"path": str(model_dir), "lora": {"tinylora": block}, "lora_rank": 0,
                                            "use_remove_padding": False}},
            "trainer": {"default_local_dir": str(tmp_path / "run"), "resume_mode": "auto"},
            "data": {"train_files": str(data), "val_files": str(data)}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_tiny_model(path)
    return path


@pytest.mark.parametrize("tinylora, message", [
    ({"tie_mode": "bogus"}, r"`tie_mode` should be one of \['none', 'tiled', 'structured', 'full'\], but the value "
                            r"passed is 'bogus'"),
    ({"bogus_key": 1}, r"Unknown TinyLoRA config keys \['bogus_key'\]"),
    ({"budget": 6}, r"budget 6 is not reachable with tie_mode='tiled' over 14 modules"),
    ({"r": 40, "budget": None}, r"r=40 exceeds min\(out, in\)=32 of model.layers.0.self_attn.k_proj \(32 x 64\)"),
    ({"target_modules": ["nope_proj"]}, r"target_modules \['nope_proj'\] match no nn.Linear in Qwen2ForCausalLM"),
    ({"sync_mode": "lora"}, r"sync_mode=lora needs actor_rollout_ref.model.lora.rank >= r=2"),
])
def test_bad_configurations_fail_on_the_driver(model_dir, tmp_path, tinylora, message):
    with pytest.raises(ValueError, match=message):
        check_run(run_cfg(model_dir, tmp_path, **tinylora))


def test_good_configuration_passes_and_missing_data_does_not(model_dir, tmp_path):
    cfg = run_cfg(model_dir, tmp_path)
    assert check_run(cfg) == []
    cfg["data"]["val_files"] = str(tmp_path / "absent.parquet")
    with pytest.raises(ValueError, match=r"data.val_files=.*absent.parquet does not exist; write GSM8K there with "
                                         r"`tinylora-verl data gsm8k --out-dir"):
        check_run(cfg)


def test_a_tilde_data_path_is_refused_even_where_the_file_exists(model_dir, tmp_path, monkeypatch):
    """verl reads ``~/x`` as ``<cwd>/~/x``: the recipes' old paths failed in the TaskRunner after Ray started."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "train.parquet").write_bytes(b"")
    cfg = run_cfg(model_dir, tmp_path)
    cfg["data"]["train_files"] = "~/train.parquet"
    with pytest.raises(ValueError, match=r"data.train_files=~/train.parquet starts with '~', which verl does not "
                                         r"expand .* use an absolute path, e.g. .*train.parquet, or "
                                         r"\$\{oc.env:HOME\}/train.parquet as the recipes do"):
        check_run(cfg)


def test_packed_sequences_need_an_attention_that_keeps_them_apart(model_dir, tmp_path):
    cfg = run_cfg(model_dir, tmp_path)
    cfg["actor_rollout_ref"]["model"] |= {"use_remove_padding": True,
                                          "override_config": {"attn_implementation": "paged_attention"}}
    with pytest.raises(ValueError, match=r"attn_implementation='paged_attention' would let them attend"):
        check_run(cfg)


def test_a_model_not_on_this_machine_is_left_to_the_workers(model_dir, tmp_path):
    cfg = run_cfg(model_dir, tmp_path)
    cfg["actor_rollout_ref"]["model"]["path"] = "nobody/not-a-cached-model"
    assert model_config_json("nobody/not-a-cached-model") is None
    notes = check_run(cfg)
    assert len(notes) == 1 and "checked in the workers" in notes[0]


def test_disabled_tinylora_checks_only_what_verl_uses(model_dir, tmp_path):
    cfg = run_cfg(model_dir, tmp_path, enable=False, tie_mode="tiled")
    assert check_run(cfg) == []


def test_the_callback_prints_one_paragraph_and_exits_2(model_dir, tmp_path, capsys):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(run_cfg(model_dir, tmp_path, tie_mode="bogus"))
    with pytest.raises(SystemExit) as e:
        Preflight().on_job_start(config=cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tinylora_verl: the run would fail, so it stops before starting Ray: `tie_mode`")


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("actor_rollout_ref.model.lora.tinylora.tie_mode=bogus", "`tie_mode` should be one of"),
    ("tinylora.budget=200", "budget 200 is not reachable with tie_mode='tiled' over 210 modules"),
    ("actor_rollout_ref.model.lora.tinylora.r=1000", "r=1000 exceeds min(out, in)=576"),
    ("+actor_rollout_ref.model.lora.tinylora.bogus_key=1", "Unknown TinyLoRA config keys ['bogus_key']"),
])
def test_main_ppo_stops_before_ray(override, message, record_property, tmp_path):
    """The recipe's Hydra callback runs the checks on the driver: verl never prints its Ray start-up line."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", "+recipe=tinylora_gsm8k_cpu", override,
                          f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    record_property("seconds_to_error", round(time.perf_counter() - start, 1))
    assert out.returncode == 2, out.stderr[-3000:]
    assert "ray init kwargs" not in out.stdout + out.stderr
    last = [line for line in out.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("tinylora_verl: the run would fail, so it stops before starting Ray") and message in last
