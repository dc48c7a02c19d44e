# tiny Shakespeare characters on a laptop CPU: ~2 minutes on 2 cores to a val loss of ~1.80 (see README).
# nanoGPT's documented CPU run is this model with lr 1e-3 and 2000 steps (~1.88); a higher learning rate
# gets further in 1500 steps (measured in the README). Runs on whatever device there is.
out_dir = "out-shakespeare-char-cpu"
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 4e-3
max_iters = 1500
lr_decay_iters = 1500
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
