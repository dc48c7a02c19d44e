"""common.py: the dtype and device chosen for the hardware there is (CUDA faked at the torch.cuda boundary),
and the character vocabulary read from a data set's meta.json; errors.py: how a script ends on a user error,
a bug or a status."""

import json

import pytest
import torch

import common
from errors import run_main
from common import UserError, pick_device, pick_dtype, read_char_vocab


# -----------------------------------------------------------------------------
# dtype='auto': native bfloat16 from compute capability 8.0 (Ampere) on, float16 before, float32 off CUDA

@pytest.fixture()
def fake_cuda(monkeypatch):
    """Make torch.cuda report one or more GPUs of a given compute capability. is_bf16_supported() answers
    True on every one of them, as it does on a real T4 or V100, where bf16 is only emulated."""
    def install(capability, count=1):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    return install


@pytest.mark.parametrize("capability, expected", [
    ((7, 0), "float16"),  # V100
    ((7, 5), "float16"),  # T4, RTX 20xx
    ((8, 0), "bfloat16"),  # A100
    ((8, 6), "bfloat16"),  # RTX 30xx, A10
    ((8, 9), "bfloat16"),  # L4, RTX 40xx
    ((9, 0), "bfloat16"),  # H100
])
def test_auto_dtype_on_cuda_follows_compute_capability(fake_cuda, capability, expected):
    fake_cuda(capability)
    device = pick_device("auto")
    assert device == "cuda"
    assert pick_dtype("auto", device) == expected
    assert pick_dtype("auto", "cuda:0") == expected
    # an explicit choice is kept as it is
    for dtype in ("float32", "bfloat16", "float16"):
        assert pick_dtype(dtype, device) == dtype


def test_auto_dtype_off_cuda_is_float32():
    assert pick_dtype("auto", "cpu") == "float32"
    assert pick_dtype("auto", "mps") == "float32"
    assert pick_dtype("bfloat16", "cpu") == "bfloat16"


@pytest.mark.parametrize("dtype, device, fragment", [
    ("float64", "cpu", "unknown dtype"),
    ("half", "cpu", "unknown dtype"),
    ("float16", "cpu", "float16 is not supported on CPU"),
])
def test_bad_dtype(dtype, device, fragment):
    with pytest.raises(UserError, match=fragment):
        pick_dtype(dtype, device)


def test_cuda_device_index_must_exist(fake_cuda):
    fake_cuda((8, 0), count=2)
    assert pick_device("cuda:1") == "cuda:1"
    with pytest.raises(UserError, match="2 CUDA device"):
        pick_device("cuda:2")
    with pytest.raises(UserError, match="unknown device"):
        pick_device("cuda:one")


def test_cuda_requested_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") in ("cpu", "mps")
    with pytest.raises(UserError, match="CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(UserError, match="unknown device"):
        pick_device("gpu")


# -----------------------------------------------------------------------------
# read_char_vocab

def write(tmp_path, content):
    path = tmp_path / "meta.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


def test_reads_what_prepare_writes(data_root):
    vocab_size, chars = read_char_vocab(f"{data_root}/shakespeare_char/meta.json")
    with open(f"{data_root}/shakespeare_char/input.txt", encoding="utf-8") as f:
        assert chars == sorted(set(f.read()))
    assert vocab_size == len(chars)


def test_vocabulary_in_token_order(tmp_path):
    meta = dict(vocab_size=3, itos={"2": "a", "0": "\n", "1": " "}, stoi={"a": 2, "\n": 0, " ": 1})
    assert read_char_vocab(write(tmp_path, meta)) == (3, ["\n", " ", "a"])


@pytest.mark.parametrize("meta", [dict(vocab_size=65), dict(vocab_size=65, itos={}, stoi={})])
def test_size_only_meta_has_no_characters(tmp_path, meta):
    # written by older tools: the size is known, the characters are not (so nothing can be decoded)
    assert read_char_vocab(write(tmp_path, meta)) == (65, None)


GOOD = dict(vocab_size=3, itos={"0": "a", "1": "b", "2": "c"})
DAMAGED = {
    "truncated": (json.dumps(GOOD)[:20], "not JSON"),
    "empty file": ("", "not JSON"),
    "a pickle": (b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x04itos\x94}\x94s.", "not JSON"),
    "a JSON list": ([1, 2, 3], "a JSON list, not an object"),
    "no vocab_size": (dict(itos=GOOD["itos"]), "vocab_size"),
    "vocab_size zero": (dict(vocab_size=0), "vocab_size"),
    "vocab_size text": (dict(vocab_size="3", itos=GOOD["itos"]), "vocab_size"),
    "vocab_size float": (dict(vocab_size=3.0, itos=GOOD["itos"]), "vocab_size"),
    "vocab_size bool": (dict(vocab_size=True), "vocab_size"),
    "itos missing an id": (dict(vocab_size=4, itos=GOOD["itos"]), "0..3"),
    "itos with an extra id": (dict(vocab_size=2, itos=GOOD["itos"]), "0..1"),
    "itos ids not numbers": (dict(vocab_size=3, itos={"a": "a", "b": "b", "c": "c"}), "0..2"),
    "itos a list": (dict(vocab_size=3, itos=["a", "b", "c"]), "itos"),
    "two characters": (dict(vocab_size=3, itos={"0": "a", "1": "bc", "2": "d"}), "itos[1]"),
    "empty character": (dict(vocab_size=3, itos={"0": "a", "1": "b", "2": ""}), "itos[2]"),
    "not a string": (dict(vocab_size=3, itos={"0": "a", "1": 7, "2": "c"}), "itos[1]"),
    "repeated character": (dict(vocab_size=3, itos={"0": "a", "1": "b", "2": "a"}), "same character"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_meta_is_one_line(tmp_path, case):
    content, fragment = DAMAGED[case]
    path = write(tmp_path, content)
    with pytest.raises(UserError) as info:
        read_char_vocab(path)
    message = str(info.value)
    assert "\n" not in message and path in message and fragment in message, message


def test_unreadable_meta_is_one_line(tmp_path):
    (tmp_path / "meta.json").mkdir()  # a folder where the file should be
    with pytest.raises(UserError) as info:
        read_char_vocab(str(tmp_path / "meta.json"))
    assert "\n" not in str(info.value) and "meta.json" in str(info.value)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989e12), ("NVIDIA GH200 480GB", 989e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A10G", 70e12), ("NVIDIA A10", 125e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("Tesla T4", 65e12),
    ("NVIDIA H20", None), ("Some Future GPU", None),
])
def test_device_peak_flops_by_device_name(monkeypatch, name, peak):
    """The first matching entry wins: an H200 is not read as anything else, nor an H100 PCIe as an SXM H100,
    and a device the table does not know has no MFU rather than a guessed one."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert common.device_peak_flops("cuda:0") == peak
    assert common.device_peak_flops("cpu") is None


# -----------------------------------------------------------------------------
# errors.run_main: a user error is one line and exit status 1; a bug keeps its traceback; a status is the exit status

def test_run_main_ends_a_user_error_in_one_line_and_a_bug_with_its_traceback(capsys):
    def mistake():
        raise UserError("--n_layer must be at least 1")
    with pytest.raises(SystemExit) as exit_info:
        run_main(mistake)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: --n_layer must be at least 1\n"

    def bug():
        raise ZeroDivisionError("a bug")
    with pytest.raises(ZeroDivisionError):  # not turned into a line: the traceback is what finds a bug
        run_main(bug)

    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: 75)
    assert exit_info.value.code == 75
    run_main(lambda: None)  # a finished script returns normally
