"""The shipping files: the Dockerfile's pins agree with the package's, lint clean, and the entrypoint works."""

import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest
import yaml

import tinylora_verl

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
SHARED_GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"


def pyproject_extra(name: str) -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][name]


def dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), flags=re.M)
    assert m, f"docker/Dockerfile has no ARG {name}=..."
    return m.group(1)


def test_verl_pin_agrees_everywhere():
    """One verl version: the image, the gpu extra, the CPU requirements and the installed package."""
    import verl

    docker = dockerfile_arg("VERL_VERSION")
    assert f"verl[vllm]=={docker}" in pyproject_extra("gpu")
    cpu_req = (ROOT / "requirements" / "cpu.txt").read_text()
    assert re.search(rf"^verl\[verl-core\]=={re.escape(docker)}$", cpu_req, flags=re.M)
    assert verl.__version__ == docker, "the installed verl moved; re-check every pin that names 0.9.1"


def test_base_image_matches_verls_vllm_pin():
    """verl's vLLM images are tagged vllm<major><minor> after the vLLM its `vllm` extra pins (0.24.0 -> vllm024)."""
    pins = [r for r in requires("verl") if r.startswith("vllm==") and 'extra == "vllm"' in r]
    assert len(pins) == 1, pins
    major, minor = pins[0].split(";")[0].removeprefix("vllm==").split(".")[:2]
    base = dockerfile_arg("BASE_IMAGE")
    assert base == f"verlai/verl:vllm{major}{int(minor):02d}.latest", (base, pins[0])


def test_plugin_version_agrees_with_runtime_env_pin():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert tinylora_verl.__version__ == version
    env_text = (ROOT / "recipes" / "runtime_env.yaml").read_text()
    assert f'# pip: ["tinylora-verl=={version}"]' in env_text
    assert f"tinylora-verl:{version}" in (ROOT / "docker" / "README.md").read_text()


def test_runtime_env_is_valid_and_installs_nothing_by_path():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((ROOT / "recipes" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    # verl finds the plugin by entry point: shipping the source by path would leave the workers without it.
    assert not {"working_dir", "py_modules"} & set(env)
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def test_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ["docker/entrypoint.sh", "recipes/ray_submit.sh", "recipes/ray_submit_cpu.sh",
                                    "bench/gpu_wheels.sh", ".ci/run"])
def test_shellcheck_clean(script):
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    proc = subprocess.run([shellcheck, str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_build_fails_without_flash_attention():
    """verl's vLLM images build flash_attn; the recipes' remove-padding needs its varlen kernels (or a refusal)."""
    run = next(block for block in DOCKERFILE.read_text().split("\nRUN ") if block.startswith("pip install"))
    assert 'python -c "import flash_attn' in run


def test_dockerfile_copies_what_the_wheel_needs():
    text = DOCKERFILE.read_text()
    for path in ("pyproject.toml", "setup.py", "hydra_configs/", "hydra_plugins/", "tinylora_verl/",
                 "docker/entrypoint.sh"):
        assert re.search(rf"^COPY .*{re.escape(path)}", text, flags=re.M), path
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def run_entrypoint(tmp_path, *args, **env):
    environ = dict(os.environ, HOME=str(tmp_path), PY=sys.executable, PATH=f"{Path(sys.executable).parent}:"
                   + os.environ["PATH"], **env)
    return subprocess.run(["bash", str(ENTRYPOINT), *args], capture_output=True, text=True, env=environ,
                          timeout=300)


def test_entrypoint_prepares_gsm8k_and_composes_the_recipe(tmp_path):
    """The container's command, minus the container: data on first run, then verl's main_ppo with the recipe."""
    proc = run_entrypoint(tmp_path, "+recipe=tinylora_gsm8k", "tinylora.budget=49", "--cfg", "job",
                          TINYLORA_VERL_GSM8K_DIR=str(SHARED_GSM8K))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "data" / "gsm8k" / "train.parquet").is_file()
    assert "writing GSM8K parquet" in proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["tinylora"]["budget"] == 49
    assert cfg["actor_rollout_ref"]["model"]["external_lib"] == "tinylora_verl.verl.register"
    again = run_entrypoint(tmp_path, "+recipe=tinylora_gsm8k_1gpu", "--cfg", "job", "--resolve")
    assert again.returncode == 0 and "writing GSM8K parquet" not in again.stderr
    assert yaml.safe_load(again.stdout)["data"]["train_files"] == f"{tmp_path}/data/gsm8k/train.parquet"


def test_entrypoint_runs_other_programs_and_guards_unknown_recipes(tmp_path):
    proc = run_entrypoint(tmp_path, "echo", "hello")
    assert proc.returncode == 0 and proc.stdout == "hello\n"
    bad = run_entrypoint(tmp_path, "+recipe=tinylora_gsm8", "--cfg", "job")
    assert bad.returncode != 0
    assert "unknown recipe 'tinylora_gsm8'" in bad.stderr
    assert not (tmp_path / "data").exists()
