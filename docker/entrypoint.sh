#!/usr/bin/env bash
# Container entrypoint: `docker run IMAGE [Hydra arguments...]` runs verl's main_ppo with them, after writing
# the GSM8K parquet files a GSM8K recipe reads (~/data/gsm8k) if they are missing. TINYLORA_VERL_GSM8K_DIR
# may point at a mounted folder of GSM8K JSONL (train.jsonl, test.jsonl); otherwise the hub copy is loaded.
# `docker run IMAGE bash` (or any other program) runs that instead.
set -euo pipefail

if [ "$#" -gt 0 ] && [[ "$1" != *=* ]] && [[ "$1" != -* ]]; then
  exec "$@"
fi

PY=${PY:-python3}
# Where the GSM8K recipes read their parquet files (data.train_files / data.val_files: ${oc.env:HOME}/data/gsm8k).
DATA=$HOME/data/gsm8k
for arg in "$@"; do
  case "$arg" in
    +recipe=tinylora_gsm8k | +recipe=tinylora_gsm8k_1gpu)
      if [ ! -f "$DATA/train.parquet" ] || [ ! -f "$DATA/test.parquet" ]; then
        echo "[tinylora-verl] writing GSM8K parquet to $DATA" >&2
        "$PY" -m tinylora_verl.apps.cli data gsm8k --out-dir "$DATA" >&2
      fi
      ;;
  esac
done
exec "$PY" -m verl.trainer.main_ppo "$@"
