"""A damaged latest checkpoint: reported, and the run resumes from the newest intact one (or stops, if asked)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import tiny_causal_lm
from tinylora_verl import TinyLoRAConfig, inject_tinylora
from tinylora_verl.apps.resume import ResumeError, check_resume, checkpoint_problems
from tinylora_verl.verl.checkpoints import ADAPTER_FILE, STATE_FILE, TRACKER_FILE

LENIENT, STRICT = SimpleNamespace(strict_resume=False), SimpleNamespace(strict_resume=True)


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder with actor checkpoints at steps 2, 4 and 6 (the tracker at 6), as the engine writes them."""
    adapter = inject_tinylora(tiny_causal_lm(), TinyLoRAConfig(budget=7))
    for step in (2, 4, 6):
        with torch.no_grad():
            adapter.vectors[0].fill_(0.01 * step)
        actor = tmp_path / f"global_step_{step}" / "actor"
        adapter.save_adapter(str(actor / ADAPTER_FILE))
        torch.save({"global_step": step}, actor / STATE_FILE.format(rank=0))
    (tmp_path / TRACKER_FILE).write_text("6")
    return tmp_path


def cfg(run: Path, **trainer) -> dict:
    return {"trainer": {"default_local_dir": str(run), "resume_mode": "auto"} | trainer}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


def with_nan(path: Path) -> None:
    """Rewrite the file's v with a NaN and a matching checksum: damage no checksum can catch."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tinylora_verl.core.adapter_io import checksum

    with safe_open(str(path), framework="pt") as f:
        meta, v = f.metadata(), f.get_tensor("v")
    v[0, 0] = float("nan")
    meta["checksum"] = checksum(v, meta["tinylora"])
    save_file({"v": v}, str(path), metadata=meta)


def test_intact_checkpoint_is_left_alone(run):
    assert check_resume(cfg(run), LENIENT) == [] and (run / TRACKER_FILE).read_text() == "6"
    assert checkpoint_problems(run / "global_step_6") == []


@pytest.mark.parametrize("damage, reason", [(truncate, "is not a TinyLoRA adapter file"),
                                            (with_nan, "1 of v's 7 values are NaN or infinite")])
def test_damaged_latest_falls_back_to_the_newest_intact(run, damage, reason):
    damage(run / "global_step_6" / "actor" / ADAPTER_FILE)
    notes = check_resume(cfg(run), LENIENT)
    assert len(notes) == 1 and reason in notes[0] and "the run resumes from step 4" in notes[0]
    assert (run / TRACKER_FILE).read_text() == "4"
    assert (run / "global_step_6.damaged" / "actor" / ADAPTER_FILE).is_file() and not (run / "global_step_6").exists()


def test_two_damaged_checkpoints_fall_back_past_both(run):
    truncate(run / "global_step_6" / "actor" / ADAPTER_FILE)
    (run / "global_step_4" / "actor" / STATE_FILE.format(rank=0)).unlink()
    check_resume(cfg(run), LENIENT)
    assert (run / TRACKER_FILE).read_text() == "2"


def test_strict_resume_stops(run):
    truncate(run / "global_step_6" / "actor" / ADAPTER_FILE)
    with pytest.raises(ResumeError, match=r"global_step_6, is damaged: .* tinylora.strict_resume=true, so the run stops"):
        check_resume(cfg(run), STRICT)
    assert (run / TRACKER_FILE).read_text() == "6"


def test_no_intact_checkpoint_stops_rather_than_start_from_scratch(run):
    for step in (2, 4, 6):
        truncate(run / f"global_step_{step}" / "actor" / ADAPTER_FILE)
    with pytest.raises(ResumeError, match=r"no earlier intact checkpoint exists .* rather than start from scratch"):
        check_resume(cfg(run), LENIENT)


def test_an_explicit_resume_path_is_never_swapped(run):
    truncate(run / "global_step_4" / "actor" / ADAPTER_FILE)
    with pytest.raises(ResumeError, match=r"trainer.resume_from_path=.*global_step_4 is damaged"):
        check_resume(cfg(run, resume_mode="resume_path", resume_from_path=str(run / "global_step_4")), LENIENT)


def test_disabled_or_fresh_runs_need_nothing(run, tmp_path):
    truncate(run / "global_step_6" / "actor" / ADAPTER_FILE)
    assert check_resume(cfg(run, resume_mode="disable"), LENIENT) == []
    assert check_resume(cfg(tmp_path / "new"), LENIENT) == []
