# one screen arm per call: ARM=name ENVS=K=V,K=V [EVAL_ARMS="n=K=V ..."]; 240 s, seed 1337, h100 preset,
# paired later on CPU against the h100 seed-1337 run of 2026-12-06 (same preset, same seed, same machine kind)
t0=$(date +%s)
export CUTLASS_MLP=0 SLOT=off TTT=1
{ nvidia-smi --query-gpu=name,power.limit --format=csv,noheader; git log --oneline -1; git status --short | head -5; } > $OUT/call.out
ev=(); for e in ${EVAL_ARMS:-}; do ev+=(--eval-arm "${e%%=*}@$ARM=${e#*=}"); done
bash bench/score_ab.sh --out $OUT/f --preset h100 --seconds 240 --seeds 1337 --slim --budget-s ${BUDGET:-560} \
  --arm "$ARM=$ENVS" "${ev[@]}" >> $OUT/call.out 2>&1
echo "rc=$? total $(( $(date +%s) - t0 )) s" >> $OUT/call.out
[ -n "${KEEP_HQA:-}" ] || rm -f $OUT/f/*/model.hqa
grep -hE "^stopped|final_(roundtrip|sliding|ttt)|^size:|eval_phases" $OUT/f/*/train.log | cut -c1-160
tail -12 $OUT/call.out
