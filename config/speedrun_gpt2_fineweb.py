# GPT-2 small (124M) on FineWeb-Edu with the choices of the current speedruns (modded-nanogpt, nanochat) that
# this repository has: Muon for the block matrices (AdamW for embeddings, norms and biases), rotary positions,
# QK-norm, ReLU² MLPs, no biases. config/train_gpt2_fineweb.py is the AdamW recipe it starts from (the same data,
# batch and evaluation); first: python data/fineweb_edu/prepare.py && python data/hellaswag/prepare.py
#
#   torchrun --standalone --nproc_per_node=8 train.py config/speedrun_gpt2_fineweb.py
#   torchrun --standalone --nproc_per_node=8 train.py config/speedrun_gpt2_fineweb.py --fsdp=True   # sharded
#
# Target: val loss 3.28, modded-nanogpt's (llm.c's GPT-2 small result on FineWeb). That is FineWeb's validation
# text; FineWeb-Edu's is easier, so 3.28 here is reached earlier than on FineWeb, and the two numbers compare
# only after both are measured. Expected cost: to be measured (steps and GPU-hours to val 3.28, against
# config/train_gpt2_fineweb.py on the same GPUs); nothing here has been run at this scale yet. max_iters is a
# ceiling: a third of the AdamW recipe's 10B tokens, where Muon reached GPT-2's loss in modded-nanogpt's
# record history; the metrics show the step at which val_loss first reaches 3.28.
import os

exec(open(os.path.join(os.path.dirname(__file__), "train_gpt2_fineweb.py")).read())  # data, batch, evaluation
out_dir = "out-speedrun-gpt2-fineweb"
wandb_run_name = "gpt2-124M-speedrun"

rope = True
qk_norm = True
mlp_act = "relu2"
bias = False

optimizer = "muon"
muon_lr = 0.02
muon_momentum = 0.95
muon_ns_steps = 5
muon_weight_decay = 0.0
# learning_rate (6e-4) is AdamW's, for the embedding (tied to lm_head) and the norms

# 6,400 steps x 524,288 tokens = 3.4B tokens at most; both rates warm up and decay together (cosine to 10%)
max_iters = 6400
lr_decay_iters = 6400
warmup_iters = 200
