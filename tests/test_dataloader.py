"""
dataloader.py, the batch stream: the rows of a batch are shifted windows at offsets that are a pure function of
(seed, stream, index), the check finds data that does not fit the model, and the dropout seeds depend on the
seed, the step and the micro-batch only (conftest.toy_stream: data 0, 1, ..., 999).
"""

import numpy as np
import pytest
import torch

from common import UserError
from dataloader import BatchStream, dropout_seed


def test_batch_stream_rows_are_shifted_windows_at_reproducible_offsets(toy_stream):
    offsets = toy_stream.offsets(0, 5, 4, "train")
    assert np.array_equal(offsets, toy_stream.offsets(0, 5, 4, "train"))  # a pure function of (seed, stream, index)
    assert not np.array_equal(offsets, toy_stream.offsets(0, 6, 4, "train"))
    x, y = toy_stream.rows("train", offsets)
    assert x.shape == (4, 8) and x.dtype == torch.int64
    for row, o in enumerate(offsets):  # the toy data's token at position p is p
        assert x[row].tolist() == list(range(o, o + 8)) and y[row].tolist() == list(range(o + 1, o + 9))


def test_batch_stream_check_finds_what_does_not_fit(toy_stream, tmp_path):
    toy_stream.check()
    small_vocab = BatchStream(toy_stream.data_dir, 8, 3, vocab_size=500)
    with pytest.raises(UserError, match="token id 999"):
        small_vocab.check()
    with pytest.raises(UserError, match="fewer than block_size"):
        BatchStream(toy_stream.data_dir, 2000, 3, 1000).check()
    with pytest.raises(UserError, match="no train data"):
        BatchStream(str(tmp_path / "nothing"), 8, 3, 1000).check()


def test_dropout_seeds_depend_on_seed_step_and_micro_batch_only():
    seeds = {(s, k, j): dropout_seed(s, k, j) for s in (1, 2) for k in range(4) for j in range(4)}
    assert len(set(seeds.values())) == len(seeds)
    assert dropout_seed(1, 2, 3) == seeds[(1, 2, 3)]
    assert 0 <= seeds[(1, 2, 3)] < 2**63

