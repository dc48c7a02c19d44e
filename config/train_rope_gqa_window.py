# all three changes together on tiny Shakespeare (GPT-2 BPE): RoPE, grouped-query attention and sliding
# windows (window on all layers but the last, which stays global, as in the mixed local/global models).
# The base, train_shakespeare.py next to this file, sizes the model for the device there is.
import os

exec(open(os.path.join(os.path.dirname(__file__), "train_shakespeare.py")).read())
out_dir = "out-rope-gqa-window"
rope = True
n_kv_head = 2
window = tuple([block_size // 4] * (n_layer - 1) + [None])  # noqa: F821 (set by train_shakespeare.py)
