# shakespeare_char with rotary position embedding instead of the learned position table.
# GPU-sized on a GPU, laptop-sized on a CPU: the base config is picked by the device there is.
import os
import torch

exec(open(os.path.join("config", "train_shakespeare_char.py" if torch.cuda.is_available() else "train_shakespeare_char_cpu.py")).read())
out_dir = "out-rope"
rope = True
