# Sourced by the proxy scripts: unpack proxy100 ($PROXY, default .proxy100) into $DATA (default /tmp/proxy100)
# unless done already, and export DATA_PATH and TOKENIZER_PATH for train_gpt.py.
PROXY=${PROXY:-.proxy100} DATA=${DATA:-/tmp/proxy100}
[ -f "$PROXY/unpack.sh" ] || { echo "error: $PROXY/unpack.sh missing: copy proxy100_sp1024 and the tokenizer there" >&2; exit 2; }
if ! [ -f "$DATA/.unpacked" ]; then
  sh "$PROXY/unpack.sh" "$DATA" >&2 && touch "$DATA/.unpacked"
fi
export DATA_PATH=$DATA TOKENIZER_PATH=$PROXY/fineweb_1024_bpe.model
