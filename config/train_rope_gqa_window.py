# all three changes together on shakespeare_char: RoPE, grouped-query attention and sliding windows
# (window on all layers but the last, which stays global, as in the mixed local/global models).
import os
import torch

exec(open(os.path.join("config", "train_shakespeare_char.py" if torch.cuda.is_available() else "train_shakespeare_char_cpu.py")).read())
out_dir = "out-rope-gqa-window"
rope = True
n_kv_head = 2
window = tuple([block_size // 4] * (n_layer - 1) + [None])
