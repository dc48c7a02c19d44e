#!/usr/bin/env bash
# The distributed figures of the README, on 2 CPU processes (gloo):
#  1. training state held per rank (parameters + gradients + AdamW state) for GPT-2 small shapes,
#     single process vs DDP vs FSDP on 2 ranks (train.py prints it after its first step);
#  2. throughput of the CPU shakespeare_char config: 1 process with 2 threads vs DDP and FSDP with
#     2 processes of 1 thread each (same global batch), median tokens/s over 100 steps.
#   bash experiments/distributed.sh [out_root]
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-out-distributed}"
python data/shakespeare/prepare.py > /dev/null
python data/shakespeare_char/prepare.py > /dev/null

echo "== training state per rank, GPT-2 small (124M) shapes, fp32"
gpt2="--dataset=shakespeare --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=1
      --gradient_accumulation_steps=2 --max_iters=1 --eval_iters=1 --eval_interval=100 --device=cpu --compile=False"
OMP_NUM_THREADS=2 python train.py $gpt2 --out_dir="$root/mem-single" | grep "holds"
for mode in ddp fsdp; do
  flag=""; [ $mode = fsdp ] && flag="--fsdp=True"
  echo "-- $mode, 2 ranks"
  OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 train.py $gpt2 $flag --out_dir="$root/mem-$mode" | grep "holds"
done

echo "== throughput, config/train_shakespeare_char_cpu.py, global batch 2 x 12 x 64 tokens"
# the AdamW quick start the table was measured with (the config has since taken Muon, QK-norm, ReLU² and batch 16)
tiny="config/train_shakespeare_char_cpu.py --optimizer=adamw --batch_size=12 --qk_norm=False --mlp_act=gelu --gradient_accumulation_steps=2 --max_iters=100 --eval_interval=1000 --eval_iters=1 --log_interval=1"
median() { python -c "import json,statistics,sys; r=[x['tokens_per_sec'] for x in map(json.loads, open(sys.argv[1])) if 'tokens_per_sec' in x][10:]; print(f'{statistics.median(r):,.0f} tokens/s')" "$1/metrics.jsonl"; }
rm -rf "$root"/tp-*
OMP_NUM_THREADS=2 python train.py $tiny --out_dir="$root/tp-single" > /dev/null; echo "single process, 2 threads: $(median $root/tp-single)"
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 train.py $tiny --out_dir="$root/tp-ddp" > /dev/null; echo "DDP, 2 x 1 thread:         $(median $root/tp-ddp)"
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 train.py $tiny --fsdp=True --out_dir="$root/tp-fsdp" > /dev/null; echo "FSDP, 2 x 1 thread:        $(median $root/tp-fsdp)"
