# tiny Shakespeare (GPT-2 BPE) with rotary position embedding instead of the learned position table.
# The base, train_shakespeare.py next to this file, sizes the model for the device there is.
import os

exec(open(os.path.join(os.path.dirname(__file__), "train_shakespeare.py")).read())
out_dir = "out-rope"
rope = True
