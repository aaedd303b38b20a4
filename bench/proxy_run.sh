#!/usr/bin/env bash
# The h100 preset on one GPU with the proxy shards: TRAIN_SECONDS of training (600 s schedule scaled down),
# then the artifact and the full legal evaluation. Usage: bash bench/proxy_run.sh [TRAIN_SECONDS] [RUN_DIR]
# Expects the proxy shards and tokenizer in $PROXY (default .proxy, git-ignored).
set -euo pipefail
PROXY=${PROXY:-.proxy}
export DATA_PATH=$PROXY TOKENIZER_PATH=$PROXY/fineweb_1024_bpe.model
export MAX_WALLCLOCK_SECONDS=${1:-120} RUN_DIR=${2:-runs/proxy_h100}
export LOG_EVERY=${LOG_EVERY:-10} SWA_EVERY=${SWA_EVERY:-10} TTT=${TTT:-1} SLOT=${SLOT:-causal}
python train_gpt.py --preset h100
