"""
Tiny Shakespeare in GPT-2 BPE tokens (tiktoken): writes train.bin and val.bin (uint16, 90/10 split).
Uses input.txt in this folder if it is there, downloads it otherwise.
"""

import os
import sys

import numpy as np
import tiktoken

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shakespeare_char"))
from prepare import read_splits  # one download routine and one 90/10 split for both Shakespeare datasets


def main(folder=os.path.dirname(os.path.abspath(__file__))):
    splits = read_splits(folder)
    enc = tiktoken.get_encoding("gpt2")
    ids = {split: np.array(enc.encode_ordinary(part), dtype=np.uint16) for split, part in splits.items()}
    for split in ("train", "val"):  # encoded both before writing either
        ids[split].tofile(os.path.join(folder, f"{split}.bin"))
        print(f"{split}: {len(ids[split]):,} tokens")


if __name__ == "__main__":
    main()
