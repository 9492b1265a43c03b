"""``python -m bench.gpu_smoke``: the GPU smoke's checks, run on the CPU exactly as CI runs them (and on a GPU where
there is one). The stand-in ``ray`` module is forced, as on a GPU box without Ray."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def smoke(tmp_path: Path, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.gpu_smoke", "--stub-ray", "--json", str(tmp_path / "r.json"),
                          "--markdown", str(tmp_path / "gpu.md"), *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    return json.loads((tmp_path / "r.json").read_text())


def check_report(report: dict, device: str, tmp_path: Path) -> None:
    assert report["device"] == device and [s["name"] for s in report["shapes"]] == ["small", "qwen2.5-7b-layers"]
    for s in report["shapes"]:
        assert len(s["checks"]) == 6, s["checks"]
        assert s["v_moved"] > 0 and s["stream_tensors"] == 27 and s["mixing_diff"] > 2 * s["packing_diff"]
        assert s["inject_s"] > 0 and s["step_s"] > 0 and s["peak_gb"] > 0 and s["overhead"] > 0
    assert "| qwen2.5-7b-layers |" in (tmp_path / "gpu.md").read_text()


@pytest.mark.slow
def test_gpu_smoke_runs_on_the_cpu(tmp_path):
    check_report(smoke(tmp_path, "--cpu"), "cpu", tmp_path)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_smoke_runs_on_a_gpu(tmp_path):
    report = smoke(tmp_path)
    check_report(report, "cuda", tmp_path)
    assert all(s["tokens"] == 4096 and s["dtype"] == "bfloat16" for s in report["shapes"])


@pytest.mark.parametrize("args, message", [
    (["--shapes", "tiny"], r"--shapes 'tiny': unknown \['tiny'\]; allowed: \['small', 'qwen2.5-7b-layers'\]"),
    (["--shapes", ","], r"--shapes ',': unknown \[\]; allowed"),
    (["--cpu", "--tokens", "8"], r"--tokens must be >= 64, got 8"),
])
def test_gpu_smoke_refuses_bad_arguments(args, message):
    import re

    out = subprocess.run([sys.executable, "-m", "bench.gpu_smoke", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and re.search(message, out.stderr), out.stderr[-2000:]


def test_ray_stub_serves_verls_import_time_uses():
    """In a fresh interpreter with Ray hidden: verl's modules on the engine path import against the stand-in."""
    code = ("import sys, importlib.abc\n"
            "class Hide(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'ray' or name.startswith('ray.'): raise ImportError('no ray here')\n"
            "sys.meta_path.insert(0, Hide())\n"
            "from bench.smoke_checks import install_ray_stub\n"
            "sys.meta_path.pop(0)\n"
            "assert install_ray_stub(force=True)\n"
            "import ray, verl.protocol, verl.workers.engine.base\n"
            "assert type(ray).__name__ == '_Anything'\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
