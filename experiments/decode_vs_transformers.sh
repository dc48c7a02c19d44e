#!/usr/bin/env bash
# Greedy decoding, this repository's GPT.generate against transformers' GPT2LMHeadModel.generate on the same
# random GPT-2 small weights (124M, vocabulary 50257), a 32-token prompt and 256 new tokens, in one process
# per row, alternating 5 times (median). float32 rows check that the tokens are identical; the bfloat16 rows
# (both models' weights cast to bf16: the opt-in path for CPUs with native bf16) report the common prefix.
# ~15 minutes on 2 CPU cores.
#   bash experiments/decode_vs_transformers.sh [results.jsonl]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-decode-vs-transformers.jsonl}"
echo "$(date '+%Y-%m-%d %H:%M'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
for dtype in float32 bfloat16; do
  for batch in 1 8; do
    echo "-- $dtype, batch $batch"
    python bench.py --mode=generate --vs_transformers=True --vocab_size=50257 --prompt_len=32 --new_tokens=256 \
      --gen_batch_size=$batch --gen_repeats=5 --dtype=$dtype --json_out="$out" \
      | grep -E "identical|tokens_per_sec|speedup"
  done
done
echo "load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
