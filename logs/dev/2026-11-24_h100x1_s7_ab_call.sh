# session 7 A/B, one machine: HEAD (0b20b24) vs gv summed in the values kernel, then micro-batch 128, then HEAD again
b() { env $2 python $3/bench/bench_train.py --data-path .proxy --presets h100 --steps 8 --paths compiled 2>&1 | grep -v Warn > $OUT/$1.txt; grep -h "| h100\|Error\|error" $OUT/$1.txt | sed "s/^/$1 /"; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
b base X=1 runs/ab_base
b gv2 X=1 .
b gv2_mb128 MICRO_BATCH_SEQS=128 .
b base_again X=1 runs/ab_base
