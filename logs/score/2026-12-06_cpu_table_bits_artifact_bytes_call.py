# The script behind 2026-12-06_cpu_table_bits_artifact_bytes_h100_s1337.txt (run from the repository root:
# python logs/score/2026-12-06_cpu_table_bits_artifact_bytes_call.py; the artifact was copied to .art/nll/h100_s1337/).
import dataclasses, torch, train_gpt as tg, hq_artifact as ha
m, cfg = tg.load_artifact('.art/nll/h100_s1337/model.hqa', torch.device('cpu'))
sizes = {}
for tb, eb in ((16, 16), (8, 16), (8, 8)):
    c = dataclasses.replace(cfg, table_bits=tb, embed_bits=eb)
    payload, table = tg.build_artifact(m, c)
    sizes[(tb, eb)] = len(ha.compress(payload, 'lzma'))
    print(f"TABLE_BITS={tb} EMBED_BITS={eb}: payload {len(payload):,} lzma {sizes[(tb, eb)]:,} (vs the first row: {sizes[(tb, eb)] - sizes[(16, 16)]:+,})")
