"""
OpenWebText in GPT-2 BPE tokens: writes train.bin (~9B tokens, ~17GB) and val.bin (~4M tokens).
Needs `pip install datasets` and ~60GB of disk for the download cache.

Recent `datasets` releases no longer run dataset loading scripts, which broke nanoGPT's version of
this file; this one loads a parquet-backed copy of the same corpus. The tokens are written by
FineWeb-Edu's tokenize_and_write (data/fineweb_edu/prepare.py): a chunk at a time, so memory stays
small, and an interrupted run continues where it stopped when started again.

Parquet conversions of script-based datasets can be partial, so the documents loaded are counted against
OpenWebText's 8,013,769: a source that was cut is said in one line before any token is written.
"""

import os
import sys
import math

# data/ on the path: its folders import as packages, and FineWeb-Edu's prepare.py holds the writer
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fineweb_edu.prepare import tokenize_and_write as write_bins, NUM_PROC

PARQUET_DATASET = "Skylion007/openwebtext"  # the parquet conversion lives under refs/convert/parquet
num_proc = NUM_PROC
VAL_FRACTION, SPLIT_SEED = 0.0005, 2357
OPENWEBTEXT_DOCUMENTS = 8_013_769  # the corpus as its loading script builds it (nanoGPT's prepare.py reads it so)


def source_note(n_docs, expected=OPENWEBTEXT_DOCUMENTS):
    """One line when the source does not hold the whole corpus, else None."""
    if n_docs == expected:
        return None
    return (f"warning: {PARQUET_DATASET} (parquet) has {n_docs:,} documents, OpenWebText has {expected:,}: "
            f"the source is {'cut' if n_docs < expected else 'larger'} ({n_docs / expected:.1%} of it), "
            "so token counts and losses will not match runs on the full corpus")


def tokenize_and_write(split_dataset, folder, num_proc=num_proc, n_shards=1024, settings=None):
    """
    split_dataset: a datasets.DatasetDict of text splits. Each split goes to folder/<split>.bin in
    n_shards chunks, tokenised with num_proc processes; a run started again after an interruption
    continues from the last chunk written. Returns {split: number of tokens}.
    """
    counts = {}
    for split, dset in split_dataset.items():
        counts.update(write_bins(dset, folder, split_of=lambda index, split=split: split, splits=(split,),
                                 num_proc=num_proc, docs_per_chunk=max(1, math.ceil(len(dset) / n_shards)),
                                 settings=settings))
    return counts


def main(folder=os.path.dirname(os.path.abspath(__file__))):
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit("error: this script needs the datasets package: pip install datasets")
    try:
        dataset = load_dataset(PARQUET_DATASET, revision="refs/convert/parquet", num_proc=num_proc)
    except OSError as e:  # no network (ConnectionError), the hub unreachable, a full disk
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(f"error: could not load {PARQUET_DATASET}: {reason[:300]}")
    note = source_note(len(dataset["train"]))
    if note:
        print(note, file=sys.stderr, flush=True)
    split_dataset = dataset["train"].train_test_split(test_size=VAL_FRACTION, seed=SPLIT_SEED, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")
    settings = dict(dataset=PARQUET_DATASET, val_fraction=VAL_FRACTION, split_seed=SPLIT_SEED)
    counts = tokenize_and_write(split_dataset, folder, settings=settings)
    print({split: f"{n:,} tokens" for split, n in counts.items()})


if __name__ == "__main__":
    main()
