# session 8: profile of the fold (working tree), inductor's code kept
export TORCHINDUCTOR_CACHE_DIR=/tmp/ic
python bench/profile_step.py --data-path .proxy --skip-attention --top 90 2>&1 | grep -v Warn > $OUT/profile.txt
i=0; for f in $(find /tmp/ic -name "*.py" -size +200k | xargs ls -S | head -4); do i=$((i+1)); cp $f $OUT/graph_$i.py; done
head -100 $OUT/profile.txt | cut -c1-200
