# one arm per call (ARM=name ENVS=K=V,K=V), 240 s, seed 1337, h100 preset, then bench/gptq_probe.py on the run's
# model.pt (float weights: QAT's or not) against the whole proxy val: rounding vs GPTQ on the same weights
t0=$(date +%s)
export CUTLASS_MLP=0 SLOT=off TTT=1
{ nvidia-smi --query-gpu=name,power.limit --format=csv,noheader; git log --oneline -1; git status --short | head -5; } > $OUT/call.out
bash bench/score_ab.sh --out $OUT/f --preset h100 --seconds 240 --seeds 1337 --budget-s 560 --arm "$ARM=$ENVS" >> $OUT/call.out 2>&1
echo "rc=$? train done $(( $(date +%s) - t0 )) s" >> $OUT/call.out
source bench/proxy_data.sh
run=$OUT/f/${ARM}_s1337
timeout $(( 585 - ($(date +%s) - t0) )) python bench/gptq_probe.py $run/model.pt --device cuda --out $OUT/probe > $OUT/probe.out 2>&1
echo "probe rc=$? total $(( $(date +%s) - t0 )) s" >> $OUT/probe.out
rm -f $run/model.pt $run/ckpt_*.pt $run/*.out; [ -n "${KEEP_HQA:-}" ] || rm -f $run/model.hqa
tar czf $OUT/probe_nll.tgz -C $OUT probe && rm -rf $OUT/probe
grep -hE "^stopped|final_(roundtrip|sliding|ttt)|^size:|^gptq" $run/train.log | cut -c1-160
tail -6 $OUT/call.out; tail -12 $OUT/probe.out
