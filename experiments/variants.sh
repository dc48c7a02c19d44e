#!/usr/bin/env bash
# The architectural-variants analysis of the README, on the device there is (the CPU configs on a CPU):
# quality (best val loss after the same budget, 3 seeds) and the plot. Takes ~40 minutes on 2 CPU cores.
#   bash experiments/variants.sh [out_root]
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-out-variants}"
python data/shakespeare_char/prepare.py > /dev/null
declare -A configs=(
  [baseline]="config/train_shakespeare_char_cpu.py"
  [rope]="config/train_rope.py"
  [gqa]="config/train_gqa.py"
  [mqa]="config/train_gqa.py --n_kv_head=1"
  [window]="config/train_window.py"
  [rope_gqa_window]="config/train_rope_gqa_window.py"
)
for seed in 1337 1338 1339; do
  for variant in baseline rope gqa mqa window rope_gqa_window; do
    out="$root/$variant-$seed"
    [ -f "$out/done" ] && continue
    rm -rf "$out"
    python train.py ${configs[$variant]} --seed=$seed --eval_iters=100 --log_interval=100 --always_save_checkpoint=False \
      --out_dir="$out" > /dev/null
    touch "$out/done"
    echo "$variant seed $seed: best val $(python -c "import json;print(min(r['val_loss'] for r in map(json.loads, open('$out/metrics.jsonl')) if 'val_loss' in r))")"
  done
done
python experiments/plot_variants.py "$root"
