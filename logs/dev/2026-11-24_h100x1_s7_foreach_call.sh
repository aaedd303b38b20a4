# session 7: micro-batch gradients summed by multi-tensor adds (forward_backward) vs .backward() accumulation, A/B vs 7b1cc41
b() { env $2 python $3/bench/bench_train.py --data-path .proxy --presets h100 --steps 8 --paths compiled 2>&1 | grep -v Warn > $OUT/$1.txt; grep -h "| h100\|Error\|error" $OUT/$1.txt | sed "s/^/$1 /"; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
b base X=1 runs/ab_xs
b foreach X=1 .
b base_again X=1 runs/ab_xs
b foreach_again X=1 .
