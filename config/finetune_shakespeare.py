# fine-tune OpenAI's GPT-2 on tiny Shakespeare (BPE): python data/shakespeare/prepare.py first.
# Add --n_kv_head=4 to turn it into a grouped-query model (keys/values mean-pooled per group) and uptrain it.
import time

out_dir = "out-shakespeare"
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = "shakespeare"
wandb_run_name = "ft-" + str(time.time())

dataset = "shakespeare"
# one command for the first launch and every relaunch: resume out_dir's run when there is one, else start
# from the smallest GPT-2 (124M; gpt2-xl needs a large GPU)
init_from = "auto"
auto_from = "gpt2"


# 1 x 32 x 1024 = 32,768 tokens per step; shakespeare has 301,966 training tokens, so 1 epoch ~ 9.2 steps
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

learning_rate = 3e-5  # a small constant learning rate for fine-tuning
decay_lr = False
