# session 7: CUDA graphs (torch.compile mode reduce-overhead) vs default on 7b1cc41's code, interleaved, one machine
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
for m in default reduce-overhead default reduce-overhead; do
  python bench/experiments/compile_mode.py $m 2>&1 | grep -v Warn | tail -3 | tee -a $OUT/compile_modes.txt
done
