#!/usr/bin/env bash
# Download the wheels that `python -m bench.gpu_smoke` needs on a GPU machine that has Python 3.12, torch,
# transformers, accelerate, peft, pandas, pyarrow, numpy, tokenizers, safetensors, huggingface-hub, fsspec, xxhash,
# pyyaml, psutil, tensorboard, pybind11, cloudpickle, packaging, ... but no verl, Ray or vLLM, and no network.
#
# Usage (here, with network to PyPI; from any directory):
#     bash bench/gpu_wheels.sh                # the wheels the CUDA smoke imports
#     bash bench/gpu_wheels.sh --cpu-extras   # plus those only the CPU platform (--cpu) imports
# The wheels land in .whl/ at the repository root (old *.whl there are removed first; add /.whl/ to
# .git/info/exclude), for Python 3.12 on x86_64 Linux, without dependencies. The script fails when they exceed
# 60 MiB. On the GPU machine, from the repository root:
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#         .whl/*.whl && export PYTHONPATH=/tmp/site
#     python -m bench.gpu_smoke --markdown docs/gpu.md
# Ray is served by the smoke's stand-in module (verl imports it at import time); vLLM is not imported on the CUDA
# path. verl 0.9.1 pins transformers<5.11 in its metadata; --no-deps keeps the machine's transformers.
set -euo pipefail

# What the CUDA smoke imports beyond the machine's packages (found by running the smoke in a venv that holds only
# those packages and adding one wheel per ModuleNotFoundError).
WHEELS=(
    verl==0.9.1                     # the engine, EngineRegistry, configs
    tensordict==0.10.0              # verl.protocol, verl.utils.tensordict_utils (cp312 manylinux wheel)
    pyvers==0.1.0                   # tensordict.utils
    orjson==3.13.0                  # verl.utils.tracking (cp312 manylinux wheel)
    omegaconf==2.3.1                # verl.utils.config
    datasets==5.2.0                 # verl.utils.dataset, imported by verl's FSDP engine module
    dill==0.4.1                     # datasets
    multiprocess==0.70.19           # datasets
    codetiming==1.4.0               # verl.utils.profiler.performance
)
# omegaconf's runtime, 4.9.* only: PyPI has just an sdist of it, built here into a pure-Python wheel.
BUILT=(
    antlr4-python3-runtime==4.9.3   # omegaconf
)
# Imported only by tinylora_verl's CPU platform (`--cpu`: verl.workers.rollout.replica, verl.utils.vllm). The CPU
# path also imports vLLM itself (through verl.utils.vllm), which is not carried, so `--cpu` needs a full install.
CPU_EXTRAS=(
    pydantic==2.14.4                # verl.workers.rollout.replica
    pydantic-core==2.50.5           # pydantic (cp312 manylinux wheel)
    typing-inspection==0.4.5        # pydantic
    annotated-types==0.8.0          # pydantic
    msgspec==0.23.0                 # verl.utils.vllm.utils (cp312 manylinux wheel)
)
LIMIT_MIB=60

case "${1:-}" in
    "") ;;
    --cpu-extras) WHEELS+=("${CPU_EXTRAS[@]}") ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "usage: bash bench/gpu_wheels.sh [--cpu-extras]" >&2; exit 2 ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."
dest=.whl
mkdir -p "$dest"
rm -f "$dest"/*.whl

python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dest" "${WHEELS[@]}"
python3 -m pip wheel --no-deps -w "$dest" "${BUILT[@]}"

shopt -s nullglob
files=("$dest"/*.whl)
expected=$((${#WHEELS[@]} + ${#BUILT[@]}))
if [[ ${#files[@]} -ne $expected ]]; then
    echo "expected $expected wheels in $dest, found ${#files[@]}" >&2
    exit 1
fi
for f in "$dest"/antlr4*.whl; do
    [[ $f == *-py3-none-any.whl ]] || { echo "$f is not a pure-Python wheel" >&2; exit 1; }
done
total=0
for f in "${files[@]}"; do
    size=$(stat -c %s "$f")
    total=$((total + size))
    printf '%10s  %s\n' "$size" "${f#"$dest"/}"
done
printf 'total: %d bytes (%d.%02d MiB) in %d wheels\n' "$total" $((total / 1048576)) \
    $((total % 1048576 * 100 / 1048576)) "${#files[@]}"
if ((total > LIMIT_MIB * 1048576)); then
    echo "the wheels exceed ${LIMIT_MIB} MiB" >&2
    exit 1
fi
echo "install on the GPU machine (from the repository root):"
echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site" \
    ".whl/*.whl && export PYTHONPATH=/tmp/site"
