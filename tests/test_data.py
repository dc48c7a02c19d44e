"""The data preparation scripts: exact token streams, checked against independent encodings of the text."""

import os
import sys
import json
import shutil
import importlib.util

import numpy as np
import pytest
import tiktoken

from conftest import REPO, shakespeare_input, run_script

TINY_SHAKESPEARE_CHARS = 1_115_394


def read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_module(path, name):
    """Import a prepare.py by path under its own name (they are all called prepare.py)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -----------------------------------------------------------------------------
# shakespeare_char: characters

def test_shakespeare_char_bins_and_meta(data_root):
    folder = os.path.join(data_root, "shakespeare_char")
    text = read_text(os.path.join(folder, "input.txt"))
    train = np.fromfile(os.path.join(folder, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(folder, "val.bin"), dtype=np.uint16)
    # 90/10 split of the characters, two bytes per token
    n = len(text)
    assert len(train) == int(n * 0.9) and len(val) == n - int(n * 0.9)
    assert os.path.getsize(os.path.join(folder, "train.bin")) == 2 * len(train)
    if n == TINY_SHAKESPEARE_CHARS:
        assert (len(train), len(val)) == (1_003_854, 111_540)

    with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)  # JSON, not a pickle: loading it runs no code
    assert meta["vocab_size"] == len(set(text))
    if n == TINY_SHAKESPEARE_CHARS:
        assert meta["vocab_size"] == 65
    itos = {int(i): ch for i, ch in meta["itos"].items()}
    assert sorted(itos) == list(range(meta["vocab_size"]))
    assert all(meta["stoi"][ch] == i for i, ch in itos.items())
    assert int(max(train.max(), val.max())) == meta["vocab_size"] - 1

    decoded = "".join(itos[int(i)] for i in np.concatenate([train, val]))
    assert decoded == text


# -----------------------------------------------------------------------------
# shakespeare: GPT-2 BPE

def test_shakespeare_bpe_bins(data_root):
    folder = os.path.join(data_root, "shakespeare")
    text = read_text(os.path.join(folder, "input.txt"))
    n = len(text)
    enc = tiktoken.get_encoding("gpt2")
    for split, part in (("train", text[:int(n * 0.9)]), ("val", text[int(n * 0.9):])):
        ids = np.fromfile(os.path.join(folder, f"{split}.bin"), dtype=np.uint16)
        assert ids.tolist() == enc.encode_ordinary(part), split
        assert enc.decode(ids.tolist()) == part
    assert not os.path.exists(os.path.join(folder, "meta.json"))  # BPE data has no character vocabulary


# -----------------------------------------------------------------------------
# no input.txt and no network: one line, no traceback, nothing written

# runs a prepare.py as __main__ with requests.get failing as it does offline
OFFLINE_RUNNER = """
import runpy, sys, requests
def offline(*args, **kwargs):
    raise requests.ConnectionError("no network in this test")
requests.get = offline
runpy.run_path(sys.argv[1], run_name="__main__")
"""


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare"])
def test_prepare_offline_without_input(tmp_path, name):
    for folder in ("shakespeare_char", "shakespeare"):  # shakespeare's prepare.py imports its sibling's
        (tmp_path / folder).mkdir()
        shutil.copy(os.path.join(REPO, "data", folder, "prepare.py"), tmp_path / folder / "prepare.py")
    result = run_script("-c", OFFLINE_RUNNER, str(tmp_path / name / "prepare.py"), timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "input.txt" in lines[0] and "download" in lines[0]
    assert sorted(os.listdir(tmp_path / name)) == ["prepare.py"]  # no bins, no meta.json, no empty input.txt


def test_fetch_input_offline_in_process(tmp_path, monkeypatch):
    import requests
    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network in this test")
    monkeypatch.setattr(requests, "get", offline)
    prepare = load_module(os.path.join(REPO, "data", "shakespeare_char", "prepare.py"), "shakespeare_char_prepare")
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(str(tmp_path))
    message = str(exit_info.value.code)
    assert message.startswith("error:") and "\n" not in message and str(tmp_path) in message
    assert os.listdir(tmp_path) == []


def test_fetch_input_uses_existing_file(tmp_path, monkeypatch):
    """An input.txt already there is used as is: no download is attempted."""
    import requests
    def no_call(*args, **kwargs):
        raise AssertionError("downloaded although input.txt is there")
    monkeypatch.setattr(requests, "get", no_call)
    (tmp_path / "input.txt").write_text("abcab\nba", encoding="utf-8")
    prepare = load_module(os.path.join(REPO, "data", "shakespeare_char", "prepare.py"), "shakespeare_char_prepare")
    prepare.main(str(tmp_path))
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    # sorted vocabulary "\n", "a", "b", "c"; int(8 * 0.9) = 7 training characters
    assert train.tolist() == [1, 2, 3, 1, 2, 0, 2]
    assert val.tolist() == [1]


# -----------------------------------------------------------------------------
# openwebtext: tokenize_and_write on a small in-memory data set

@pytest.fixture(scope="module")
def openwebtext_prepare():
    pytest.importorskip("datasets")
    return load_module(os.path.join(REPO, "data", "openwebtext", "prepare.py"), "openwebtext_prepare")


@pytest.mark.parametrize("num_proc, n_shards", [(1, 1024), (1, 2), (2, 3)])
def test_openwebtext_tokenize_and_write(tmp_path, openwebtext_prepare, num_proc, n_shards):
    import datasets
    docs = {
        "train": ["Hello world!", "", "The quick brown fox jumps over the lazy dog. " * 20,
                  "naïve café – ünïcödé ✓ 日本語", "<|endoftext|> is plain text here", "last one"],
        "val": ["A single validation document."],
    }
    split_dataset = datasets.DatasetDict({split: datasets.Dataset.from_dict({"text": texts}) for split, texts in docs.items()})
    counts = openwebtext_prepare.tokenize_and_write(split_dataset, str(tmp_path), num_proc=num_proc, n_shards=n_shards)

    enc = tiktoken.get_encoding("gpt2")
    for split, texts in docs.items():
        expected = [t for text in texts for t in enc.encode_ordinary(text) + [50256]]
        path = tmp_path / f"{split}.bin"
        assert os.path.getsize(path) == 2 * len(expected)  # uint16: two bytes per token
        ids = np.fromfile(path, dtype=np.uint16)
        assert ids.tolist() == expected, split
        assert counts[split] == len(expected)
    assert set(counts) == {"train", "val"}
    assert max(expected) > 32767  # ids above int16's range survive (50256 here)
