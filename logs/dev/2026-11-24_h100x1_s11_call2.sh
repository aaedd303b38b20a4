# session 11, call 2: the CUTLASS example's attention backward (fp16) vs cuDNN's; a profile of 1e98aa4's step
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
python bench/experiments/cutlass_fmha.py --backward --batch 128 --iters 20 2>&1 | grep -v Warn | tee $OUT/cutlass_fmha_bwd.txt
python bench/profile_step.py --data-path .proxy --skip-attention --top 150 2>&1 | grep -v Warn > $OUT/profile.txt
grep -n "idle\|category\|split\|optimizer" $OUT/profile.txt | cut -c1-200
