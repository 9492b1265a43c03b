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


# The GPU machine's image as the device tool's KINDS.md lists it (its Python packages; no verl, Ray or vLLM).
DEVICE_IMAGE = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split())


def wheel_list(name: str) -> dict[str, str]:
    """``{distribution: version}`` of one bash array of bench/gpu_wheels.sh (``NAME==VERSION  # why`` per line)."""
    import re

    text = (ROOT / "bench" / "gpu_wheels.sh").read_text()
    block = re.search(rf"^{name}=\((.*?)^\)", text, flags=re.M | re.S).group(1)
    return dict(re.findall(r"^\s*([\w.-]+)==([\w.]+)", block, flags=re.M))


def normalized(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def test_wheel_script_lists_what_the_smoke_imports(tmp_path):
    """On a path holding only the GPU image's distributions and bench/gpu_wheels.sh's (linked from this venv, in a
    fresh interpreter without site-packages), the smoke's CUDA path imports; the pins match this machine's."""
    import importlib.metadata

    wheels = wheel_list("WHEELS") | wheel_list("BUILT")
    for dist, version in wheels.items():
        assert importlib.metadata.version(dist) == version, (dist, version)
    allowed = {normalized(n) for n in DEVICE_IMAGE | set(wheels)}
    site = tmp_path / "site"
    site.mkdir()
    for dist in importlib.metadata.distributions():
        if normalized(dist.metadata["Name"]) not in allowed:
            continue
        root = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or [] if f.parts and not f.parts[0].startswith("..")}:
            if (root / top).exists() and not (site / top).exists() and top != "__pycache__":
                (site / top).symlink_to(root / top)
    code = ("from bench.smoke_checks import install_ray_stub\n"
            "assert install_ray_stub()\n"  # Ray is absent here, so the stand-in is installed without forcing it
            "import bench.gpu_smoke, tinylora_verl.verl.register\n"
            "import verl.workers.engine.fsdp.transformer_impl, verl.workers.utils.losses, verl.utils.tensordict_utils\n"
            "import sys; assert 'vllm' not in sys.modules\n"
            "print('ok')\n")
    env = {"PYTHONPATH": f"{ROOT}:{site}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
