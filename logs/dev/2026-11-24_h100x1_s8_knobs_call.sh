# session 8: knobs on HEAD's code: inductor pointwise autotuning, a 64 MiB cuBLASLt workspace; interleaved with plain runs
b() { env $2 timeout $3 python bench/bench_train.py --data-path .proxy --presets h100 --steps 8 --paths compiled 2>&1 | grep -v Warn > $OUT/$1.txt; grep -h "| h100\|Error\|error" $OUT/$1.txt | sed "s/^/$1 /"; }
b base X=1 200
b pointwise TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE=1 330
b base_again X=1 200
b workspace CUBLASLT_WORKSPACE_SIZE=65536 200
