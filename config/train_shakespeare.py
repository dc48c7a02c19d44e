# a GPT trained from scratch on tiny Shakespeare in GPT-2 BPE tokens (python data/shakespeare/prepare.py):
# the baseline of the variant configs (train_rope.py, train_gqa.py, train_window.py, train_rope_gqa_window.py),
# sized for the device there is. 301,966 training tokens overfit fast: evaluate often, keep the best.
import torch

out_dir = "out-shakespeare-bpe"
log_interval = 10

dataset = "shakespeare"
gradient_accumulation_steps = 1
warmup_iters = 50
min_lr = 1e-4
beta2 = 0.99  # few tokens per step

if torch.cuda.is_available():
    # the baby GPT of train_shakespeare_char.py: 8,192 tokens per step, ~27 steps an epoch
    eval_interval = 100
    eval_iters = 100
    batch_size = 32
    block_size = 256
    n_layer = 6
    n_head = 6
    n_embd = 384
    dropout = 0.2
    learning_rate = 1e-3
    max_iters = 1000
    lr_decay_iters = 1000
else:
    # a CPU: the 50304 x 128 token embedding (tied to the output layer) is most of the parameters and
    # most of the compute, so the model stays small and the run short: a few minutes on 2 cores
    eval_interval = 50
    eval_iters = 10
    batch_size = 12
    block_size = 64
    n_layer = 4
    n_head = 4
    n_embd = 128
    dropout = 0.0
    learning_rate = 2e-3
    max_iters = 300
    lr_decay_iters = 300
