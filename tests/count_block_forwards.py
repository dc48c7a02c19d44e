"""
Runs train.py (arguments as given) with every transformer block's forward counted while training, then
prints `rank R: block forwards while training N`. Used by the activation-checkpointing tests under torchrun:
recomputation in backward runs each block's forward a second time.
"""

import os
import sys
import runpy

from helpers import REPO  # noqa: E402  (it puts the repository on sys.path)
import model  # noqa: E402  (patched before train.py imports it)

calls = 0
original_forward = model.Block.forward


def counting_forward(self, *args, **kwargs):
    global calls
    if self.training:
        calls += 1
    return original_forward(self, *args, **kwargs)


model.Block.forward = counting_forward
sys.argv = [os.path.join(REPO, "train.py"), *sys.argv[1:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print(f"rank {os.environ.get('RANK', '0')}: block forwards while training {calls}", flush=True)
