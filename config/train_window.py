# shakespeare_char with sliding-window attention: each token sees itself and the window-1 before it.
# A quarter of the context per layer; the receptive field still covers the block through the layers.
import os
import torch

exec(open(os.path.join("config", "train_shakespeare_char.py" if torch.cuda.is_available() else "train_shakespeare_char_cpu.py")).read())
out_dir = "out-window"
window = block_size // 4
