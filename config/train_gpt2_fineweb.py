# GPT-2 small (124M) on 10B tokens of FineWeb-Edu with HellaSwag along the way: the recipe of llm.c and
# build-nanogpt (GPT-3's hyperparameters for its 125M model: 0.5M-token batches, lr 6e-4, cosine to 10%).
# First: python data/fineweb_edu/prepare.py && python data/hellaswag/prepare.py
#
# 8 GPUs (one micro-step of 64 x 1024 tokens each):
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_fineweb.py
# 1 GPU: the same global batch in 8 micro-steps of 64 sequences (an 80 GB card; on smaller ones halve
# batch_size and double gradient_accumulation_steps until it fits, e.g. --batch_size=16
# --gradient_accumulation_steps=32; the step stays 524,288 tokens):
#   python train.py config/train_gpt2_fineweb.py
# Then: python eval_hellaswag.py --init_from=resume --out_dir=out-gpt2-fineweb
import os

_repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # paths from any working directory

out_dir = "out-gpt2-fineweb"
wandb_log = False
wandb_project = "fineweb-edu"
wandb_run_name = "gpt2-124M-10B"

dataset = "fineweb_edu"
data_root = os.path.join(_repo, "data")

# 64 sequences x 1024 tokens x 8 micro-steps (global, over all processes) = 524,288 = 2**19 tokens per step
batch_size = 64
block_size = 1024
gradient_accumulation_steps = 8

# 19,073 steps x 524,288 tokens = 10.0B tokens: one pass over sample-10BT
max_iters = 19073
lr_decay_iters = 19073
warmup_iters = 715  # 375M tokens, GPT-3's warmup
learning_rate = 6e-4
min_lr = 6e-5  # 10% of the peak
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
dropout = 0.0

# val loss on 80 x 64 x 1024 = 5.2M held-out tokens, and the 10,042 HellaSwag examples, every 250 steps
eval_interval = 250
eval_iters = 80
log_interval = 10
hellaswag_interval = 250
hellaswag_path = os.path.join(_repo, "data", "hellaswag", "hellaswag_val.jsonl")
