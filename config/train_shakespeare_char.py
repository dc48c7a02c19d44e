# a baby GPT on tiny Shakespeare characters, sized for one GPU (nanoGPT's recipe: ~1.47 val loss)
out_dir = "out-shakespeare-char"
eval_interval = 250  # small data: evaluate often, it overfits
eval_iters = 200
log_interval = 10

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # 256 characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # a baby network can take a higher learning rate
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99  # a little higher than GPT-2's because there are few tokens per step
warmup_iters = 100
