#!/usr/bin/env bash
# The architectural-variants table of the README: best val loss of each variant after the same budget,
# 3 seeds, then the plot. ~100 s a run, ~30 minutes on 2 CPU cores.
#   bash experiments/variants.sh [out_root]
# The recipe is nanoGPT's CPU run on shakespeare_char (4 layers, 4 heads, 128 wide, block 64, batch 12,
# lr 1e-3, 2000 steps), fp32 on the CPU as measured. Every model, optimizer, schedule and evaluation
# setting is a flag here rather than a config file, so tuning a config cannot change the table.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-out-variants}"
export OMP_NUM_THREADS=1  # measured single-threaded: another thread count may change the last digits
python data/shakespeare_char/prepare.py > /dev/null
recipe=(
  --init_from=scratch --dataset=shakespeare_char --device=cpu --dtype=float32 --compile=False --attn_impl=auto
  --gradient_accumulation_steps=1 --batch_size=12 --block_size=64
  --n_layer=4 --n_head=4 --n_embd=128 --dropout=0.0 --bias=True --rope_theta=10000.0
  --learning_rate=1e-3 --max_iters=2000 --weight_decay=0.1 --beta1=0.9 --beta2=0.99 --grad_clip=1.0
  --decay_lr=True --warmup_iters=100 --lr_decay_iters=2000 --min_lr=1e-4
  --eval_interval=250 --eval_iters=100 --log_interval=100
)
declare -A flags=(
  [baseline]="--rope=False --n_kv_head=None --window=None"
  [rope]="--rope=True --n_kv_head=None --window=None"
  [gqa]="--rope=False --n_kv_head=2 --window=None"
  [mqa]="--rope=False --n_kv_head=1 --window=None"
  [window]="--rope=False --n_kv_head=None --window=16"
  [rope_gqa_window]="--rope=True --n_kv_head=2 --window=(16,16,16,None)"
)
for seed in 1337 1338 1339; do
  for variant in baseline rope gqa mqa window rope_gqa_window; do
    out="$root/$variant-$seed"
    [ -f "$out/done" ] && continue
    rm -rf "$out"
    # shellcheck disable=SC2086  # the flags are split into words on purpose
    python train.py "${recipe[@]}" ${flags[$variant]} --seed=$seed --out_dir="$out" > /dev/null
    touch "$out/done"
    echo "$variant seed $seed: best val $(python -c "import json,sys; print(min(r['val_loss'] for r in map(json.loads, open(sys.argv[1])) if 'val_loss' in r))" "$out/metrics.jsonl")"
  done
done
python experiments/plot_variants.py "$root"
