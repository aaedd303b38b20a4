# session 7: XSA backward in the output projection's matmul. Microbench, then A/B vs 8d0883a (gv2 + micro-batch 128)
(cd bench/experiments && python xsa_proj.py 2>&1 | grep -v Warn > $OUT/xsa_proj.txt; cat $OUT/xsa_proj.txt)
b() { env $2 python $3/bench/bench_train.py --data-path .proxy --presets h100 --steps 8 --paths compiled 2>&1 | grep -v Warn > $OUT/$1.txt; grep -h "| h100\|Error\|error" $OUT/$1.txt | sed "s/^/$1 /"; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
b base X=1 runs/ab_s7
b xsaproj X=1 .
b base_again X=1 runs/ab_s7
b xsaproj_again X=1 .
