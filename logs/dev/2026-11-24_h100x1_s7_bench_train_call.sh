# session 7 final table: bench_train for both presets, compiled and unfused, on 7b1cc41's counted code
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
python bench/bench_train.py --data-path .proxy --presets h100,3090 --steps 8 --paths compiled,unfused 2>&1 | grep -v Warn | tee $OUT/bench_train.txt
