# session 11, call 8: bench_train on another machine: tree (ae97d5f), HEAD~1 (1e98aa4's training code), tree
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm,temperature.gpu --format=csv -l 5 > $OUT/nvidia-smi.csv &
OUT=$OUT bash bench/ab.sh new1=. old1=runs/ab_old new2=.
