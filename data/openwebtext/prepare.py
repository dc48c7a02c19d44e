"""
OpenWebText in GPT-2 BPE tokens: writes train.bin (~9B tokens, ~17GB) and val.bin (~4M tokens).
Needs `pip install datasets` and ~60GB of disk for the download cache.

Recent `datasets` releases no longer run dataset loading scripts, which broke nanoGPT's version of
this file; this one loads a parquet-backed copy of the same corpus.
"""

import os
import sys

import numpy as np
import tiktoken
from tqdm import tqdm

PARQUET_DATASET = "Skylion007/openwebtext"  # the parquet conversion lives under refs/convert/parquet
num_proc = max(1, (os.cpu_count() or 2) // 2)


def tokenize(example, enc=None):
    enc = enc or tiktoken.get_encoding("gpt2")
    ids = enc.encode_ordinary(example["text"])
    ids.append(enc.eot_token)  # <|endoftext|> (50256) separates documents
    return {"ids": ids, "len": len(ids)}


def tokenize_and_write(split_dataset, folder, num_proc=num_proc, n_shards=1024):
    """
    split_dataset: a datasets.DatasetDict of text splits. Tokenises with num_proc processes and writes
    each split to folder/<split>.bin through a memmap, shard by shard, so memory stays small.
    Returns {split: number of tokens}.
    """
    tokenized = split_dataset.map(tokenize, remove_columns=["text"], desc="tokenizing", num_proc=num_proc)
    counts = {}
    for split, dset in tokenized.items():
        total = int(np.sum(dset["len"], dtype=np.uint64))
        path = os.path.join(folder, f"{split}.bin")
        out = np.memmap(path, dtype=np.uint16, mode="w+", shape=(total,))
        shards = max(1, min(n_shards, len(dset)))
        index = 0
        for shard in tqdm(range(shards), desc=f"writing {path}"):
            batch = dset.shard(num_shards=shards, index=shard, contiguous=True).with_format("numpy")
            ids = np.concatenate(batch["ids"]) if len(batch) else np.zeros(0, dtype=np.uint16)
            out[index:index + len(ids)] = ids
            index += len(ids)
        out.flush()
        counts[split] = total
    return counts


def main(folder=os.path.dirname(os.path.abspath(__file__))):
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit("error: this script needs the datasets package: pip install datasets")
    dataset = load_dataset(PARQUET_DATASET, revision="refs/convert/parquet", num_proc=num_proc)
    split_dataset = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")
    counts = tokenize_and_write(split_dataset, folder)
    print({split: f"{n:,} tokens" for split, n in counts.items()})


if __name__ == "__main__":
    main()
