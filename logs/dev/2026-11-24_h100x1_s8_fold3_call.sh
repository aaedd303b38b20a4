# session 8: fold with the MLP kernel's row-scale load before its main loop, vs HEAD e3e7737, interleaved
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
OUT=$OUT bash bench/ab.sh base=runs/ab_s8 fold=. base_again=runs/ab_s8 fold_again=.
