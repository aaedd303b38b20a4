# runs/ab_s9 = git archive 4d72a35 (HEAD before the change: CUTLASS's automatic epilogue tile); "." = the tree with HQ_EPI 64x64
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; export PYTHONUNBUFFERED=1; OUT=$OUT bash bench/ab.sh auto=runs/ab_s9 epi64=. auto_again=runs/ab_s9 epi64_again=.
