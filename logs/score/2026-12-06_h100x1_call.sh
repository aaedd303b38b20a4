# call 1: fill arm (h100 preset with VO_ALPHABET=64 BIGRAM_VOCAB=3072) seed 1337 at 240 s, then the official-size eval
t0=$(date +%s)
export CUTLASS_MLP=0 SLOT=off TTT=1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv | tee $OUT/gpu.txt
git log --oneline -1 | tee $OUT/commit.txt; git diff --stat | tee -a $OUT/commit.txt
bash bench/score_ab.sh --out $OUT/f --preset h100 --seconds 240 --seeds ${SEED:-1337} --arm fill= > $OUT/score_ab.out 2>&1
tail -8 $OUT/score_ab.out
rm -f $OUT/f/*/model.pt $OUT/f/*/ckpt_*.pt
echo "train phase done at $(( $(date +%s) - t0 )) s"
if [ -n "${BIG:-}" ]; then
  python bench/tile_val.py /tmp/proxy100/fineweb_val_000000.bin /tmp/big 7752704
  left=$(( 590 - ($(date +%s) - t0) ))
  echo "eval-only budget $left s"
  DATA_PATH=/tmp/big TOKENIZER_PATH=.proxy100/fineweb_1024_bpe.model RUN_DIR=$OUT/evalbig timeout $left \
    python train_gpt.py --eval-only $OUT/f/fill_s1337/model.hqa > $OUT/evalbig.out 2>&1
  echo "eval rc=$?"; grep -E "eval_phase|final_|ttt:|targets" $OUT/evalbig.out | cut -c1-200; tail -3 $OUT/evalbig.out
fi
grep -hE "^stopped|final_(roundtrip|sliding|ttt)|^size:" $OUT/f/*/train.log
echo "total $(( $(date +%s) - t0 )) s"
