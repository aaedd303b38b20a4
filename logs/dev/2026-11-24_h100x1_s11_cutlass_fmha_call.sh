# session 11, call 1: CUTLASS attention forward vs cuDNN's, and cuDNN's backward on CUTLASS's O/LSE
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
nvidia-smi --query-gpu=name,power.limit,clocks.sm --format=csv
python bench/experiments/cutlass_fmha.py --batch 128 48 --iters 20 2>&1 | grep -v Warn | tee $OUT/cutlass_fmha.txt
