#!/usr/bin/env bash
# Submit a tinylora_verl recipe to a running Ray cluster as a Ray job:
#   RAY_ADDRESS=http://<head>:8265 NNODES=2 bash recipes/ray_submit.sh [Hydra overrides...]
# RECIPE (default tinylora_gsm8k), NNODES (trainer.nnodes, default 1), GPUS_PER_NODE (default 4),
# RUNTIME_ENV (default recipes/runtime_env.yaml), PY (python on the nodes, default python3), RAY (ray CLI),
# SUBMISSION_ID (optional job id). The job first checks that every node imports the plugin at this version
# (python -m tinylora_verl.verl.cluster check), then runs verl's unchanged main_ppo with the recipe.
set -euo pipefail

: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://head-node:8265}"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RECIPE=${RECIPE:-tinylora_gsm8k}
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
RUNTIME_ENV=${RUNTIME_ENV:-$HERE/runtime_env.yaml}
PY=${PY:-python3}
RAY=${RAY:-ray}

case "$NNODES$GPUS_PER_NODE" in
  *[!0-9]*) echo "NNODES=$NNODES and GPUS_PER_NODE=$GPUS_PER_NODE must be positive integers" >&2; exit 2 ;;
esac

# Ray shell-quotes every entrypoint word, so the preflight-then-run chain is one `bash -c` line whose words
# are quoted here (printf %q).
CHECK=$(printf '%q ' "$PY" -m tinylora_verl.verl.cluster check --nodes "$NNODES")
RUN=$(printf '%q ' "$PY" -m verl.trainer.main_ppo +recipe="$RECIPE" trainer.nnodes="$NNODES" \
  trainer.n_gpus_per_node="$GPUS_PER_NODE" "$@")

set -x
"$RAY" job submit --address "$RAY_ADDRESS" --runtime-env "$RUNTIME_ENV" \
  ${SUBMISSION_ID:+--submission-id "$SUBMISSION_ID"} -- bash -c "$CHECK&& $RUN"
