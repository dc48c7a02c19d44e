# tiny Shakespeare (GPT-2 BPE) with grouped-query attention: 2 key/value heads shared by the query heads
# (GPU: 6 query heads -> 2 KV heads; CPU: 4 -> 2). --n_kv_head=1 is multi-query attention.
# The base, train_shakespeare.py next to this file, sizes the model for the device there is.
import os

exec(open(os.path.join(os.path.dirname(__file__), "train_shakespeare.py")).read())
out_dir = "out-gqa"
n_kv_head = 2
