# session 7: micro-batches on two CUDA streams (MB_STREAMS=1) vs one, working tree (gv2), one machine
b() { env $2 python $3/bench/bench_train.py --data-path .proxy --presets h100 --steps 8 --paths compiled 2>&1 | grep -v Warn > $OUT/$1.txt; grep -h "| h100\|Error\|error" $OUT/$1.txt | sed "s/^/$1 /"; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
b gv2 X=1 .
b gv2_streams MB_STREAMS=1 .
b gv2_mb128 MICRO_BATCH_SEQS=128 .
b gv2_streams_mb128 MB_STREAMS=1\ MICRO_BATCH_SEQS=128 .
