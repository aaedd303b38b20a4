# session 8: the block's RMS norm folded past its matmuls (norm_scale) vs HEAD e3e7737, interleaved
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv -lms 2000 > $OUT/smi.csv 2>&1 &
OUT=$OUT bash bench/ab.sh base=runs/ab_s8 fold=. base_again=runs/ab_s8 fold_again=.
grep -h "peak\|GiB" $OUT/fold.txt | head -5
