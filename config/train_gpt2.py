# GPT-2 small (124M) on OpenWebText, as nanoGPT's reference run: 8 GPUs, ~4 days on A100s to ~2.85 val loss
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
wandb_log = False
wandb_project = "owt"
wandb_run_name = "gpt2-124M"

# 12 sequences x 1024 tokens x 40 micro-steps (global) = 491,520 tokens per step (~0.5M, GPT-3's choice)
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# 600,000 steps: ~300B tokens
max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
