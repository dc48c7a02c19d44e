"""
Tiny Shakespeare as characters: writes train.bin and val.bin (uint16 token ids, 90/10 split) and
meta.json (the character vocabulary, JSON so that loading it never runs code).
Uses input.txt in this folder if it is there, downloads it otherwise.
"""

import os
import sys
import json

import numpy as np
import requests

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def fetch_input(folder):
    """Path of input.txt in folder, downloading it first when it is missing."""
    path = os.path.join(folder, "input.txt")
    if not os.path.exists(path):
        try:
            response = requests.get(DATA_URL, timeout=30)
            response.raise_for_status()
        except requests.RequestException as e:
            sys.exit(f"error: could not download tiny Shakespeare ({type(e).__name__}); "
                     f"put input.txt from {DATA_URL} in {folder} and run this again")
        with open(path, "w", encoding="utf-8") as f:
            f.write(response.text)
    return path


def read_splits(folder):
    """input.txt of folder (downloaded first when missing), cut 90/10 into {"train": ..., "val": ...}.
    Text that cannot give both parts is an error here, before anything is written."""
    path = fetch_input(folder)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        sys.exit(f"error: {path} is not UTF-8 text ({e.reason} at byte {e.start}); put tiny Shakespeare's input.txt there")
    if not text.strip():
        sys.exit(f"error: {path} is {'only whitespace' if text else 'empty'}; put tiny Shakespeare's input.txt "
                 f"from {DATA_URL} there")
    n = len(text)
    splits = {"train": text[:int(n * 0.9)], "val": text[int(n * 0.9):]}
    if not all(splits.values()):
        sys.exit(f"error: {path} has {n} character(s), too few to split 90/10 into train and val text")
    return splits


def main(folder=os.path.dirname(os.path.abspath(__file__))):
    splits = read_splits(folder)
    chars = sorted(set(splits["train"] + splits["val"]))
    stoi = {ch: i for i, ch in enumerate(chars)}
    for split, part in splits.items():
        ids = np.array([stoi[ch] for ch in part], dtype=np.uint16)
        ids.tofile(os.path.join(folder, f"{split}.bin"))
        print(f"{split}: {len(ids):,} tokens")
    meta = dict(vocab_size=len(chars), itos={i: ch for i, ch in enumerate(chars)}, stoi=stoi)
    with open(os.path.join(folder, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f)
    print(f"{sum(map(len, splits.values())):,} characters, vocabulary of {len(chars)}")


if __name__ == "__main__":
    main()
