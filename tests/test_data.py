"""The data preparation scripts: exact token streams, checked against independent encodings of the text."""

import os
import json
import shutil
import importlib.util

import numpy as np
import pytest
import tiktoken

from helpers import REPO, run_script, assert_user_error

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
# input.txt missing (and no network) or unusable: one line, no traceback, nothing written

def copy_prepare_scripts(root):
    for folder in ("shakespeare_char", "shakespeare"):  # shakespeare's prepare.py imports its sibling's
        (root / folder).mkdir()
        shutil.copy(os.path.join(REPO, "data", folder, "prepare.py"), root / folder / "prepare.py")


def folder_state(folder):
    """Name -> bytes of every file in folder: to prove a failing run wrote nothing."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


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
    copy_prepare_scripts(tmp_path)
    result = run_script("-c", OFFLINE_RUNNER, str(tmp_path / name / "prepare.py"), timeout=120)
    line = assert_user_error(result, "input.txt", "download")
    assert line.startswith("error:")
    assert sorted(os.listdir(tmp_path / name)) == ["prepare.py"]  # no bins, no meta.json, no empty input.txt


# text that cannot give a train and a val part: empty, only whitespace, one character; and bytes that are not UTF-8
DEGENERATE_INPUTS = {
    "empty": (b"", ["input.txt", "empty"]),
    "whitespace": (b" \n\t\n  \n", ["input.txt", "whitespace"]),
    "one character": (b"A", ["input.txt", "1 character", "split"]),
    "not utf-8": (b"To be\xff\xfe or not", ["input.txt", "UTF-8"]),
}


@pytest.mark.parametrize("case", list(DEGENERATE_INPUTS))
@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare"])
def test_prepare_degenerate_input_is_one_line_and_writes_nothing(tmp_path, name, case):
    content, fragments = DEGENERATE_INPUTS[case]
    copy_prepare_scripts(tmp_path)
    folder = tmp_path / name
    (folder / "input.txt").write_bytes(content)
    # bins and meta.json of an earlier, good run stay as they were
    (folder / "train.bin").write_bytes(b"\x01\x00" * 8)
    (folder / "val.bin").write_bytes(b"\x02\x00" * 2)
    if name == "shakespeare_char":
        (folder / "meta.json").write_text('{"vocab_size": 3, "itos": {"0": "a", "1": "b", "2": "c"}}')
    before = folder_state(folder)
    line = assert_user_error(run_script(str(folder / "prepare.py"), timeout=120), *fragments)
    assert line.startswith("error:")
    assert folder_state(folder) == before
    # and from an empty folder but for input.txt: no bin, no meta.json
    for stale in ("train.bin", "val.bin", "meta.json"):
        if (folder / stale).exists():
            (folder / stale).unlink()
    assert_user_error(run_script(str(folder / "prepare.py"), timeout=120), *fragments)
    assert sorted(os.listdir(folder)) == ["input.txt", "prepare.py"]


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare"])
def test_prepare_smallest_input_that_splits(tmp_path, name):
    # two characters: one for train, one for val
    copy_prepare_scripts(tmp_path)
    folder = tmp_path / name
    (folder / "input.txt").write_text("ab", encoding="utf-8")
    run_script(str(folder / "prepare.py"), timeout=120, check=True)
    train = np.fromfile(folder / "train.bin", dtype=np.uint16).tolist()
    val = np.fromfile(folder / "val.bin", dtype=np.uint16).tolist()
    if name == "shakespeare_char":
        assert (train, val) == ([0], [1])
    else:
        enc = tiktoken.get_encoding("gpt2")
        assert (train, val) == (enc.encode_ordinary("a"), enc.encode_ordinary("b"))


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


def test_openwebtext_counts_its_documents(tmp_path, openwebtext_prepare, monkeypatch, capsys):
    """A cut source is said in one line (a fake hub of 6 documents); the whole corpus's count says nothing."""
    import datasets
    texts = ["Hello world!", "The quick brown fox.", "naïve café", "a", "b", "last one"]
    hub = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: hub)
    monkeypatch.setattr(openwebtext_prepare, "VAL_FRACTION", 0.5)
    monkeypatch.setattr(openwebtext_prepare, "num_proc", 1)
    openwebtext_prepare.main(folder=str(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    notes = [line for line in err if line.startswith("warning:")]
    assert len(notes) == 1 and "6 documents" in notes[0] and "8,013,769" in notes[0] and "cut" in notes[0], err
    enc = tiktoken.get_encoding("gpt2")
    written = np.fromfile(tmp_path / "train.bin", dtype=np.uint16).tolist() + np.fromfile(tmp_path / "val.bin", dtype=np.uint16).tolist()
    assert sorted(written) == sorted(t for text in texts for t in enc.encode_ordinary(text) + [50256])  # and it went on
    assert openwebtext_prepare.source_note(8_013_769) is None
    assert openwebtext_prepare.OPENWEBTEXT_DOCUMENTS == 8_013_769
