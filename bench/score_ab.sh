#!/usr/bin/env bash
# bench/score_ab.py on the proxy100 shards (unpacked once by proxy_data.sh); arguments pass through.
# Example: bash bench/score_ab.sh --out $OUT/ab --seconds 120 --arm base=WARMUP_BY_CLOCK=1 --arm b=...
set -euo pipefail
source "$(dirname "$0")/proxy_data.sh"
export LOG_EVERY=${LOG_EVERY:-10} SWA_EVERY=${SWA_EVERY:-10}
python bench/score_ab.py "$@"
