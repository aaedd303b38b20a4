# session 8: RMS norm folded past the matmuls, gradient on the input side (norm_grad) vs HEAD e3e7737, interleaved; then a profile
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
OUT=$OUT bash bench/ab.sh base=runs/ab_s8 fold=. base_again=runs/ab_s8 fold_again=.
grep -h "peak\|GiB" $OUT/fold.txt | head -3
export TORCHINDUCTOR_CACHE_DIR=/tmp/ic
python bench/profile_step.py --data-path .proxy --skip-attention --top 60 2>&1 | grep -v Warn > $OUT/profile.txt
i=0; for f in $(find /tmp/ic -name "*.py" -size +200k | xargs ls -S | head -2); do i=$((i+1)); cp $f $OUT/graph_$i.py; done
grep -A2 "by category" $OUT/profile.txt; head -30 $OUT/profile.txt | cut -c1-150
