# shakespeare_char with grouped-query attention: 2 key/value heads shared by the query heads
# (GPU: 6 query heads -> 2 KV heads; CPU: 4 -> 2). n_kv_head=1 is multi-query attention.
import os
import torch

exec(open(os.path.join("config", "train_shakespeare_char.py" if torch.cuda.is_available() else "train_shakespeare_char_cpu.py")).read())
out_dir = "out-gqa"
n_kv_head = 2
