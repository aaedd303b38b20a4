# session 11, call 9: 240 s proxy run of ae97d5f again, another machine (seed 1337), nvidia-smi beside it
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm,temperature.gpu,clocks_throttle_reasons.active --format=csv -l 5 > $OUT/nvidia-smi.csv &
SEED=1337 bash bench/proxy_run.sh 240 $OUT/run > $OUT/stdout.txt 2>&1
grep -E "inductor:|cutlass_mlp|step:(10|100|200|300|390|400)/|stopping|final_|saved|bytes|ttt|sliding|slot" $OUT/run/train.log | cut -c1-200 | tail -30
