#!/usr/bin/env bash
# Step time of several versions of the code on one machine, one after another: bench_train's h100 preset,
# compiled, 8 steps, each version in its own process. Usage: bash bench/ab.sh LABEL=DIR [LABEL=DIR ...]
# DIR holds a copy of the repo's code ("." for the working tree), e.g. git archive 8a58909 | tar -x -C .snap/x
# Reads proxy100 through proxy_data.sh; writes DIR's bench output to $OUT/LABEL.txt (OUT default .)
set -uo pipefail
source "$(dirname "$0")/proxy_data.sh"
OUT=${OUT:-.}
for pair in "$@"; do
  label=${pair%%=*} dir=${pair#*=}
  [ -f "$dir/bench/bench_train.py" ] || { echo "ab.sh: $dir has no bench/bench_train.py" >&2; exit 2; }
  python "$dir/bench/bench_train.py" --data-path "$DATA_PATH" --presets h100 --steps 8 --paths compiled 2>&1 \
    | grep -v Warn > "$OUT/$label.txt"
  grep -h "| h100\|Error\|error" "$OUT/$label.txt" | sed "s/^/$label /"
done
