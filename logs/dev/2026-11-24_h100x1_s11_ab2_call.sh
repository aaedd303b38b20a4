# session 11, call 6: bench_train A/B again, interleaved: tree (mix-order split 32, 2 stages), HEAD, HEAD, tree
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm,temperature.gpu --format=csv -l 5 > $OUT/nvidia-smi.csv &
OUT=$OUT bash bench/ab.sh new1=. old1=runs/ab_old old2=runs/ab_old new2=.
