# evaluate OpenAI's gpt2 on OpenWebText: python train.py config/eval_gpt2.py
batch_size = 8
eval_iters = 500  # more iterations for a better estimate
eval_only = True
wandb_log = False
init_from = "gpt2"
