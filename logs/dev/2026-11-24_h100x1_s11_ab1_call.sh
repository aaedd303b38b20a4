# session 11, call 5: mix-order reduction kernels at candidate configs; bench_train A/B: tree (split 32, 2 stages), HEAD, default split + 3 stages
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
python -c "import torch, torch._inductor.config as c; print('split', c.triton.mix_order_reduction_split_size, 'multi_stages', c.triton.mix_order_reduction_allow_multi_stages, 'smem', torch.cuda.get_device_properties(0).shared_memory_per_block_optin)" 2>&1 | tee $OUT/config.txt
python bench/experiments/mix_order_kernels.py .art/graphs/s11_bwd_1e98aa4.py --configs "32,4,2,2;64,4,2,2;128,4,2,2;128,4,2,3;64,4,2,3;32,4,4,2;32,8,4,2" 2>&1 | grep -v Warn | tee $OUT/mix_order_configs.txt
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm,temperature.gpu --format=csv -l 5 > $OUT/nvidia-smi.csv &
OUT=$OUT bash bench/ab.sh new=. old=runs/ab_old s3=runs/ab_s3
