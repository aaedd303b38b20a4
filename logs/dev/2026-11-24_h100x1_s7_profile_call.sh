# session 7: profile of the working tree (gv2, micro-batch 128) with inductor's generated code kept
export TORCHINDUCTOR_CACHE_DIR=/tmp/ic
python bench/profile_step.py --data-path .proxy --skip-attention --top 70 2>&1 | grep -v Warn > $OUT/profile.txt
i=0; for f in $(find /tmp/ic -name "*.py" -size +200k | xargs ls -S | head -4); do i=$((i+1)); cp $f $OUT/graph_$i.py; done
ls -la $OUT; tail -5 $OUT/profile.txt
