"""Every command in README.md is exercised: run here when cheap, otherwise named tests that run it (or its body).

Adding a command to the README without a row here fails ``test_every_readme_command_is_exercised``.
"""

import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tinylora_verl.core.config import TinyLoRAConfig
from tinylora_verl.verl.options import TinyLoRAVerlOptions

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# (command pattern, tests that run it or exactly what it runs). Patterns are matched against whole commands.
COVERAGE = [
    (r"make demo", ["tests/test_readme.py::test_make_targets_run_what_they_say",
                    "tests/verl/test_cpu_e2e.py::test_two_grpo_steps_move_v"]),
    (r"make test", ["tests/test_readme.py::test_ci_runs_the_readme_test_command"]),
    (r"make bench", ["tests/test_readme.py::test_make_targets_run_what_they_say",
                     "tests/test_bench.py::test_main_writes_report"]),
    (r'pip install "\.\[gpu\]"', ["tests/test_docker.py::test_verl_pin_agrees_everywhere",
                                  "tests/verl/test_gpu.py::test_paper_recipe_runs_two_steps_on_four_gpus"]),
    (r"pip install flash-attn==2\.8\.3 --no-build-isolation",
     ["tests/test_docker.py::test_image_build_fails_without_flash_attention",
      "tests/verl/test_attention.py::test_flash_attention_needs_its_package_on_a_gpu"]),
    (r"python -m verl\.trainer\.main_ppo \+recipe=tinylora_gsm8k_1gpu",
     ["tests/verl/test_recipes.py::test_one_gpu_recipe_is_the_paper_recipe_on_qwen_1_5b",
      "tests/verl/test_hardware.py::test_one_gpu_recipe_is_the_paper_recipe_on_other_hardware"]),
    (r"python -m verl\.trainer\.main_ppo \+recipe=tinylora_gsm8k --cfg job --resolve",
     ["tests/verl/test_entry.py::test_main_ppo_resolves_data_paths_without_a_tilde"]),
    (r"\.venv/bin/python -m verl\.trainer\.main_ppo \+recipe=tinylora_gsm8k \+hardware=cpu",
     ["tests/verl/test_shipped_recipes_e2e.py::test_paper_gsm8k_recipe_sweeps_on_the_cpu_overlay"]),
    (r"bash bench/gpu_wheels\.sh", ["tests/test_gpu_smoke.py::test_wheel_script_lists_what_the_smoke_imports"]),
    (r"python -m bench\.gpu_smoke --markdown docs/gpu\.md", ["tests/test_gpu_smoke.py::test_gpu_smoke_runs_on_a_gpu"]),
    (r"python -m bench\.gpu_smoke --cpu", ["tests/test_gpu_smoke.py::test_gpu_smoke_runs_on_the_cpu"]),
    (r"\.venv/bin/python -m tinylora_verl\.apps\.cpu_study --out \S+",
     ["tests/apps/test_cpu_study.py::test_dry_run_prints_the_plan",
      "tests/verl/test_recipes.py::test_sft_recipe_composes_and_passes_verl_validation",
      "tests/verl/test_hardware.py::test_study_recipe_changes_only_data_batches_rate_and_length"]),
    (r"tinylora-verl data gsm8k --sft --out-dir ~/data/gsm8k_sft",
     ["tests/tasks/test_data.py::test_gsm8k_sft_rows_are_the_rl_prompt_then_the_solution",
      "tests/verl/test_shipped_recipes_e2e.py::test_sft_recipe_trains_v_through_verls_sft_trainer_on_the_cpu_overlay"]),
    (r"(\.venv/bin/)?torchrun --standalone --nproc_per_node=\d -m verl\.trainer\.sft_trainer \+recipe=tinylora_gsm8k_sft"
     r"( \+hardware=cpu_sft)?",
     ["tests/verl/test_recipes.py::test_sft_recipe_composes_and_passes_verl_validation",
      "tests/verl/test_shipped_recipes_e2e.py::test_sft_recipe_trains_v_through_verls_sft_trainer_on_the_cpu_overlay"]),
    (r"tinylora-verl data gsm8k --out-dir ~/data/gsm8k( --prompt-style oneshot)?",
     ["tests/apps/test_cli.py::test_data_subcommand_writes_parquet", "tests/tasks/test_data.py::test_gsm8k_prompt_styles"]),
    (r"python -m verl\.trainer\.main_ppo \+recipe=tinylora_gsm8k",
     ["tests/verl/test_recipes.py::test_recipe_composes_and_passes_verl_validation",
      "tests/verl/test_gpu.py::test_paper_recipe_runs_two_steps_on_four_gpus"]),
    (r"docker build -f docker/Dockerfile -t tinylora-verl:[\d.]+ \.", ["tests/test_docker.py::test_hadolint_clean",
                                                                      "tests/test_docker.py::test_dockerfile_copies_what_the_wheel_needs"]),
    (r"docker run .* tinylora-verl:[\d.]+ \+recipe=tinylora_gsm8k .*",
     ["tests/test_docker.py::test_entrypoint_prepares_gsm8k_and_composes_the_recipe"]),
    (r"\.venv/bin/python -m verl\.trainer\.main_ppo \+recipe=tinylora_gsm8k_cpu",
     ["tests/verl/test_cpu_e2e.py::test_two_grpo_steps_move_v"]),
    (r"\.venv/bin/python -m verl\.trainer\.main_ppo \+recipe=tinylora_gsm8k_cpu_learn",
     ["tests/apps/test_sweep.py::test_ray_sweep_submits_jobs_and_collects"]),
    (r"\.venv/bin/python -m tinylora_verl\.apps\.cpu_learning --out \S+",
     ["tests/apps/test_cpu_learning.py::test_study_resumes_and_continues_the_winner",
      "tests/test_readme.py::test_cheap_commands_run"]),
    (r"RAY_ADDRESS=\S+ NNODES=\d+ bash recipes/ray_submit\.sh",
     ["tests/verl/test_ray_submit.py::test_ray_job_submission_trains_and_checkpoints",
      "tests/verl/test_cluster.py::test_check_fails_loudly"]),
    (r"STEPS=2 PY=\.venv/bin/python bash recipes/ray_submit_cpu\.sh",
     ["tests/verl/test_ray_submit.py::test_ray_job_submission_trains_and_checkpoints"]),
    (r"python -m tinylora_verl\.apps\.sweep --out \S+ --dry-run", ["tests/test_readme.py::test_cheap_commands_run",
                                                             "tests/apps/test_sweep.py::test_default_grid_is_the_papers"]),
    (r"python -m tinylora_verl\.apps\.sweep --out \S+ --backend ray .*",
     ["tests/apps/test_sweep.py::test_ray_sweep_submits_jobs_and_collects"]),
    (r"tinylora-verl plan --model \S+ --budget 13", ["tests/test_readme.py::test_cheap_commands_run",
                                                     "tests/apps/test_cli.py::test_plan_qwen7b_13"]),
    (r"tinylora-verl prepare-smollm2", ["tests/apps/test_models.py::test_conversion_is_cached_and_faithful"]),
    (r"tinylora-verl export .*", ["tests/apps/test_cli.py::test_export_merged_and_lora"]),
    (r"tinylora-verl show .*", ["tests/apps/test_cli.py::test_show"]),
    (r"tinylora-verl eval .*", ["tests/apps/test_eval.py::test_cli_eval", "tests/apps/test_eval.py::test_vllm_eval_base_merged_lora",
                                "tests/apps/test_eval.py::test_load_gsm8k_prompt_style_matches_training_records"]),
    (r"tinylora-verl plot \S+", ["tests/apps/test_eval.py::test_plot_metrics"]),
]

# Run here by test_cheap_commands_run (each takes seconds).
CHEAP = [
    "tinylora-verl plan --model tests/data/configs/qwen2.5-7b-instruct.json --budget 13",
    "python -m tinylora_verl.apps.sweep --out outputs/sweep --dry-run",
    ".venv/bin/python -m tinylora_verl.apps.cpu_learning --out outputs/cpu_learning --dry-run",
]


def readme_commands() -> list[str]:
    """Shell lines of the README's ```bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def test_every_readme_command_is_exercised():
    commands = readme_commands()
    assert len(commands) >= 15, commands
    for cmd in commands:
        matches = [tests for pattern, tests in COVERAGE if re.fullmatch(pattern, cmd)]
        assert matches, f"README command without a test: {cmd!r}; add it to COVERAGE with the tests that run it"


def test_coverage_names_real_tests():
    for _, tests in COVERAGE:
        for ref in tests:
            path, name = ref.split("::")
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), flags=re.M), ref


def test_every_coverage_row_is_used():
    commands = readme_commands()
    for pattern, _ in COVERAGE:
        assert any(re.fullmatch(pattern, c) for c in commands), f"COVERAGE row {pattern!r} matches no README command"


@pytest.mark.parametrize("cmd", CHEAP)
def test_cheap_commands_run(cmd, tmp_path):
    argv = shlex.split(cmd)
    if argv[0] == "tinylora-verl":
        argv = [sys.executable, "-m", "tinylora_verl.apps.cli", *argv[1:]]
    elif argv[0].endswith("python"):
        argv = [sys.executable, *argv[1:]]
    argv = [str(tmp_path / a) if a.startswith("outputs/") else a for a in argv]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
    assert any(c == cmd or c.startswith(cmd.removesuffix(" --dry-run")) for c in readme_commands()), cmd


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\s*make test\b", ci, flags=re.M)
    assert readme_commands()[:2] == ["make demo", "make test"]


def test_make_targets_run_what_they_say():
    """`make -n` shows each target's command; the tests named in COVERAGE run those commands' bodies."""
    proc = subprocess.run(["make", "-n", "-W", "requirements/cpu.txt", "demo", "bench"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\.venv/bin/python -m tinylora_verl\.apps\.demo --steps \d+ --out outputs/demo", proc.stdout)
    assert ".venv/bin/python -m bench.run" in proc.stdout


def test_key_table_lists_every_tinylora_key_with_its_default():
    section = README.split("## TinyLoRA keys")[1].split("\n## ")[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+?) \|", section, flags=re.M))
    fields = {f.name: f for f in dataclasses.fields(TinyLoRAConfig) + dataclasses.fields(TinyLoRAVerlOptions)}
    assert set(rows) == set(fields)
    for name, f in fields.items():
        if name == "target_modules":
            assert all(m.removesuffix("_proj") in rows[name] for m in f.default)
            continue
        shown = rows[name].strip("`")
        expected = {None: "null", False: "false", True: "true"}.get(f.default, str(f.default))
        assert shown == expected or float(shown) == f.default, (name, shown, f.default)
