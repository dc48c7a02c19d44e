"""
Tiny Shakespeare in GPT-2 BPE tokens (tiktoken): writes train.bin and val.bin (uint16, 90/10 split).
Uses input.txt in this folder if it is there, downloads it otherwise.
"""

import os
import sys

import numpy as np
import tiktoken

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shakespeare_char"))
from prepare import fetch_input  # one download routine for both Shakespeare datasets


def main(folder=os.path.dirname(os.path.abspath(__file__))):
    with open(fetch_input(folder), encoding="utf-8") as f:
        text = f.read()
    n = len(text)
    enc = tiktoken.get_encoding("gpt2")
    for split, part in (("train", text[:int(n * 0.9)]), ("val", text[int(n * 0.9):])):
        ids = np.array(enc.encode_ordinary(part), dtype=np.uint16)
        ids.tofile(os.path.join(folder, f"{split}.bin"))
        print(f"{split}: {len(ids):,} tokens")


if __name__ == "__main__":
    main()
