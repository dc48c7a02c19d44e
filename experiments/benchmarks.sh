#!/usr/bin/env bash
# The benchmark figures of the README (bench.py), on the device there is. On 2 CPU cores: ~30 minutes.
#   bash experiments/benchmarks.sh [results.jsonl]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-results.jsonl}"

echo "== training step per variant: 6 layers x 384 wide (6 heads), T=1024, batch 2"
model="--n_layer=6 --n_head=6 --n_embd=384 --block_size=1024 --batch_size=2 --warmup_steps=2 --steps=5"
for v in "baseline:" "rope:--rope=True" "gqa:--n_kv_head=2" "mqa:--n_kv_head=1" "window:--window=256" \
         "rope_gqa_window:--rope=True --n_kv_head=2 --window=(256,256,256,256,256,None)"; do
  echo "-- ${v%%:*}"
  python bench.py $model ${v#*:} --json_out="$out" | grep -E "params|flops|tokens_per_sec|ms_per|peak|kv_bytes"
done

echo "== attention forward+backward vs T, GPT-2 small heads (12 x 64), batch 1"
python bench.py --mode=attention --attn_repeats=2 --json_out="$out"

echo "== generation, GPT-2 small shapes (124M), 512 new tokens after 16, greedy, with the KV cache"
for v in "mha:" "gqa:--n_kv_head=4" "mqa:--n_kv_head=1" "window:--window=128"; do
  echo "-- ${v%%:*}"
  python bench.py --mode=generate --new_tokens=512 ${v#*:} --json_out="$out" | grep -E "tokens_per_sec|kv_cache"
done
echo "-- mha without the cache (the whole context every step: ~10 minutes on 2 cores)"
python bench.py --mode=generate --new_tokens=512 --use_cache=False --json_out="$out" | grep -E "tokens_per_sec"

echo "== long generation, peak memory: rope + window 256 on every layer vs rope with global attention"
echo "   (6 layers x 384, cached, 8192 new tokens: positions run far past block_size=1024)"
for v in "rope_window:--window=256" "rope_global:"; do
  echo "-- ${v%%:*}"
  python bench.py --mode=generate --n_layer=6 --n_head=6 --n_embd=384 --rope=True --beyond_block_size=True \
    --new_tokens=8192 --memory_at="(1024,2048,4096,8192)" ${v#*:} --json_out="$out" | grep -E "tokens_per_sec|peak_mem|kv_cache"
done
