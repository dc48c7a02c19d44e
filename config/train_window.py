# tiny Shakespeare (GPT-2 BPE) with sliding-window attention: each token sees itself and the window-1
# before it. A quarter of the context per layer; through the layers the receptive field still covers the block.
# The base, train_shakespeare.py next to this file, sizes the model for the device there is.
import os

exec(open(os.path.join(os.path.dirname(__file__), "train_shakespeare.py")).read())
out_dir = "out-window"
window = block_size // 4  # noqa: F821 (set by train_shakespeare.py, run above)
