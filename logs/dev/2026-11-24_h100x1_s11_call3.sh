# session 11, call 3: inductor's code for the largest backward kernels of 1e98aa4's step
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
export TORCHINDUCTOR_CACHE_DIR=/tmp/ic
python bench/profile_step.py --data-path .proxy --skip-attention --top 60 2>&1 | grep -v Warn > $OUT/profile.txt
mkdir -p $OUT/kernels
for k in $(grep -o "triton_[a-z_0-9]*" $OUT/profile.txt | sort -u); do
  for f in $(grep -l "def $k(" -r /tmp/ic --include=*.py 2>/dev/null | head -3); do cp $f $OUT/kernels/${k}__$(basename $f); done
done
i=0; for f in $(find /tmp/ic -name "*.py" -size +100k | xargs ls -S | head -6); do i=$((i+1)); cp $f $OUT/graph_$i.py; done
ls $OUT/kernels | wc -l; ls -la $OUT/graph_*.py; grep -n "category" $OUT/profile.txt
