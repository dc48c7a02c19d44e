"""
The data: a data set's vocabulary (data_vocabulary), and its batches as a pure function of (seed, step), so runs are
reproducible, resume exactly and train alike on any number of processes (BatchStream); dropout's seeds follow the
same rule (dropout_seed).
"""

import os

import numpy as np
import torch

from errors import UserError
from model import PADDED_GPT2_VOCAB_SIZE
from common import read_char_vocab

# the batch stream's generators: the training batches, the fixed evaluation batches of each split, and dropout's
TRAIN_STREAM = 0
EVAL_STREAMS = {"train": 1, "val": 2}
DROPOUT_STREAM = 3


class BatchStream:
    """
    Rows of block_size + 1 tokens from data_dir/{train,val}.bin at offsets that are a pure function of
    (seed, stream, index): TRAIN_STREAM is training (index = step), EVAL_STREAMS the fixed evaluation batches
    of each split. Every process computes the whole global batch's offsets and takes its slice.
    """

    def __init__(self, data_dir, block_size, seed, vocab_size):
        self.data_dir, self.block_size, self.seed, self.vocab_size = data_dir, block_size, seed, vocab_size

    def path(self, split):
        return os.path.join(self.data_dir, f"{split}.bin")

    def tokens(self, split):
        # a fresh memmap per batch avoids the memory growth of keeping one open (nanoGPT's note)
        return np.memmap(self.path(split), dtype=np.uint16, mode="r")

    def check(self):
        """All data problems a user can cause, found before any work is done."""
        dataset = os.path.basename(os.path.normpath(self.data_dir))
        for split in ("train", "val"):
            path = self.path(split)
            if not os.path.exists(path):
                raise UserError(f"no {split} data at {path}; prepare it first with: python data/{dataset}/prepare.py")
            size = os.path.getsize(path)
            if size % 2:  # uint16 tokens: an odd size is a file cut short or not a token file at all
                raise UserError(f"{path} is {size:,} bytes, not a whole number of 2-byte tokens: it is cut short or "
                                f"not a token file; prepare it again with python data/{dataset}/prepare.py")
            n = size // 2
            if n < self.block_size + 1:
                raise UserError(f"{path} has {n} tokens, fewer than block_size + 1 = {self.block_size + 1}; "
                                f"use a smaller --block_size or more data")
            if n <= 200_000_000:  # a full scan is quick below this size; larger sets are checked batch by batch
                top = int(self.tokens(split).max())
                if top >= self.vocab_size:
                    raise UserError(f"{path} holds token id {top}, not below the model's vocab_size {self.vocab_size}: "
                                    f"the data and the model disagree; prepare the data again with python data/{dataset}/prepare.py")

    def offsets(self, stream, index, rows, split):
        n_tokens = len(self.tokens(split))
        return np.random.default_rng([self.seed, stream, index]).integers(0, n_tokens - self.block_size, size=rows)

    def rows(self, split, offsets):
        """(inputs, targets) as int64 tensors of shape (len(offsets), block_size)."""
        data = self.tokens(split)
        x = np.stack([data[o:o + self.block_size] for o in offsets]).astype(np.int64)
        y = np.stack([data[o + 1:o + 1 + self.block_size] for o in offsets]).astype(np.int64)
        if x.max() >= self.vocab_size or y.max() >= self.vocab_size:
            raise UserError(f"{self.path(split)} holds a token id >= vocab_size {self.vocab_size}; prepare the data again")
        return torch.from_numpy(x), torch.from_numpy(y)


def dropout_seed(seed, step, micro_batch):
    """The seed of the dropout masks of global micro-batch `micro_batch` of `step`, whichever process runs it."""
    entropy = [seed, DROPOUT_STREAM, step, micro_batch]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def data_vocabulary(data_dir):
    """(vocab_size, character list or None): a character set's meta.json, else GPT-2's padded BPE."""
    meta_path = os.path.join(data_dir, "meta.json")
    if os.path.exists(meta_path):
        return read_char_vocab(meta_path)
    return PADDED_GPT2_VOCAB_SIZE, None
