#!/usr/bin/env bash
# Run the CPU recipe as a Ray job: start a local Ray head, submit to it with recipes/ray_submit.sh (the same
# script as for a GPU cluster: node preflight, then verl's main_ppo), stop the head.
#   STEPS=2 OUT=outputs/ray_job bash recipes/ray_submit_cpu.sh [extra Hydra overrides...]
# The head advertises logical resources for what verl asks of a CPU box (cpu_base: 16 CPUs, 1 "GPU" slot),
# and the job leaves ray_init's resource arguments empty: Ray refuses them when joining an existing cluster.
set -xeuo pipefail

PY=${PY:-$(command -v python)}
# Absolute: the job's entrypoint does not run in this directory.
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
RAY=${RAY:-$(dirname "$PY")/ray}
STEPS=${STEPS:-2}
OUT=$(realpath -m "${OUT:-outputs/ray_job}")
PORT=${RAY_DASHBOARD_PORT:-8265}
CACHE=${TINYLORA_VERL_CACHE:-$HOME/.cache/tinylora_verl}
# Ray 2.60 starts heads with token authentication; the job client must use it too (token in ~/.ray/auth_token).
export TINYLORA_VERL_CACHE=$CACHE RAY_TMPDIR=${RAY_TMPDIR:-/tmp/ray_tinylora} RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

"$PY" -m tinylora_verl.apps.cli prepare-smollm2
if [ ! -f "$CACHE/data/gsm8k_oneshot/train.parquet" ]; then
  "$PY" -m tinylora_verl.apps.cli data gsm8k --prompt-style oneshot --out-dir "$CACHE/data/gsm8k_oneshot"
fi
mkdir -p "$OUT"

# --block keeps this head's `ray start` in the foreground of a background job: stopping exactly that process
# stops this cluster, where `ray stop` would kill every Ray process on the machine.
"$RAY" start --head --block --num-cpus 16 --num-gpus 1 --dashboard-host 127.0.0.1 --dashboard-port "$PORT" \
  --disable-usage-stats --temp-dir "$RAY_TMPDIR" &
HEAD=$!
trap 'kill -TERM "$HEAD" 2>/dev/null; wait "$HEAD" 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  "$RAY" job list --address "http://127.0.0.1:$PORT" >/dev/null 2>&1 && break
  kill -0 "$HEAD" || exit 1
  sleep 1
done

RAY_ADDRESS="http://127.0.0.1:$PORT" RECIPE=tinylora_gsm8k_cpu NNODES=1 GPUS_PER_NODE=1 PY="$PY" RAY="$RAY" \
  bash "$(dirname "${BASH_SOURCE[0]}")/ray_submit.sh" \
  ray_kwargs.ray_init.num_cpus=null ray_kwargs.ray_init.num_gpus=null \
  trainer.total_training_steps="$STEPS" trainer.default_local_dir="$OUT" hydra.run.dir="$OUT/hydra" "$@"
