#!/usr/bin/env bash
# The laptop run of the README: nanoGPT's documented CPU recipe and this repository's CPU config,
# side by side on the same machine (wall time of the whole command, best val loss).
#   bash experiments/cpu_run.sh [out_root]
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-out-cpu-run}"
python data/shakespeare_char/prepare.py > /dev/null
best() { python -c "import json,sys; print(min(r['val_loss'] for r in map(json.loads, open(sys.argv[1])) if 'val_loss' in r))" "$1/metrics.jsonl"; }
run() {  # name, then train.py arguments
  local name=$1; shift
  rm -rf "$root/$name"
  local start=$(date +%s.%N)
  python train.py "$@" --out_dir="$root/$name" > /dev/null
  local end=$(date +%s.%N)
  echo "$name: best val loss $(best "$root/$name"), wall $(python -c "print(f'{$end - $start:.0f}')") s"
}
# nanoGPT README: --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
#   --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0  (val ~1.88)
run nanogpt-recipe config/train_shakespeare_char_cpu.py --learning_rate=1e-3 --max_iters=2000 --lr_decay_iters=2000 --log_interval=1
run cpu-config config/train_shakespeare_char_cpu.py
