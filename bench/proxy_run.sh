#!/usr/bin/env bash
# The h100 preset on one GPU with the proxy100 shards: TRAIN_SECONDS of training (600 s schedule scaled down),
# then the artifact and the full legal evaluation. Usage: bash bench/proxy_run.sh [TRAIN_SECONDS] [RUN_DIR] [FLAGS]
# (FLAGS go to train_gpt.py: --overwrite to replace the run already in RUN_DIR)
# Expects proxy100's compressed folder (unpack.sh, SHA256SUMS, *.bin.xz, val shard) plus the tokenizer in
# $PROXY (default .proxy100, git-ignored); unpacks and checks the shards into $DATA (default /tmp/proxy100) once.
set -euo pipefail
source "$(dirname "$0")/proxy_data.sh"
export MAX_WALLCLOCK_SECONDS=${1:-120} RUN_DIR=${2:-runs/proxy_h100}
export LOG_EVERY=${LOG_EVERY:-10} SWA_EVERY=${SWA_EVERY:-10} TTT=${TTT:-1} SLOT=${SLOT:-causal}
python train_gpt.py --preset "${PRESET:-h100}" "${@:3}"
