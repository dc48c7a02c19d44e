"""
FineWeb-Edu's prepare.py up to the network: tokenize_and_write on small in-memory datasets.Dataset
objects against tiktoken run document by document, continuing after an interruption (byte-identical to
an uninterrupted run), and main() with the hub replaced by in-memory data sets.
"""

import os
import sys
import json
import importlib.util

import numpy as np
import pytest
import tiktoken

from helpers import REPO

datasets = pytest.importorskip("datasets")

N_DOCS = 230
VAL_TOKENS = 500  # the first 500 tokens of the stream are validation: the boundary falls inside a document


@pytest.fixture(scope="module")
def fineweb():
    """The script as a module, registered in sys.modules so that its pool workers can find encode_document."""
    name = "fineweb_edu_prepare"
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "data", "fineweb_edu", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


def fake_documents(n=N_DOCS, prefix="Document"):
    words = ["the", "quick", "brown", "fox", "naïve", "café", "日本語", "✓", "tokens", "\n", "  ", "<|endoftext|>"]
    rng = np.random.default_rng(0)
    docs = [f"{prefix} {i}: " + " ".join(rng.choice(words, size=int(rng.integers(0, 40)))) for i in range(n)]
    docs[7] = ""  # an empty document is one <|endoftext|>
    return docs


def expected_bins(docs, val_tokens=VAL_TOKENS):
    """The token streams, written independently: tiktoken on each document in order, one stream cut after
    its first val_tokens tokens (llm.c's and build-nanogpt's split: their first shard is validation)."""
    enc = tiktoken.get_encoding("gpt2")
    stream = [t for text in docs for t in enc.encode_ordinary(text) + [enc.eot_token]]
    return {"train": stream[val_tokens:], "val": stream[:val_tokens]}


def read_bins(folder):
    return {split: np.fromfile(os.path.join(folder, f"{split}.bin"), dtype=np.uint16).tolist() for split in ("train", "val")}


def as_dataset(docs):
    # an extra column, as the hub's files have (id, url, score, ...): only "text" is read
    return datasets.Dataset.from_dict({"text": docs, "score": list(range(len(docs)))})


@pytest.mark.parametrize("num_proc, docs_per_chunk", [(1, 64), (2, 37), (1, 10_000)])
def test_tokenize_and_write_matches_tiktoken(tmp_path, fineweb, num_proc, docs_per_chunk):
    docs = fake_documents()
    counts = fineweb.tokenize_and_write(as_dataset(docs), str(tmp_path), num_proc=num_proc, docs_per_chunk=docs_per_chunk,
                                        val_tokens=VAL_TOKENS)
    expected = expected_bins(docs)
    assert read_bins(tmp_path) == expected
    enc = tiktoken.get_encoding("gpt2")
    assert expected["val"][-1] != enc.eot_token  # the boundary cuts a document, as the test means it to
    assert counts == {split: len(ids) for split, ids in expected.items()}
    assert max(expected["train"]) == 50256 and len(expected["val"]) > 0
    with open(tmp_path / "progress_train_val.json") as f:
        state = json.load(f)
    assert state["complete"] and state["documents_done"] == N_DOCS


def test_continues_after_an_interruption(tmp_path, fineweb, monkeypatch, capsys):
    docs, chunk = fake_documents(), 40
    # the validation boundary falls inside the third chunk, the one the interruption hits
    enc = tiktoken.get_encoding("gpt2")
    val_tokens = sum(len(enc.encode_ordinary(text)) + 1 for text in docs[:2 * chunk + 5]) + 3
    reference = tmp_path / "reference"
    reference.mkdir()
    fineweb.tokenize_and_write(as_dataset(docs), str(reference), num_proc=1, docs_per_chunk=chunk, val_tokens=val_tokens)
    assert read_bins(reference) == expected_bins(docs, val_tokens)

    # stop while recording the third chunk: its tokens are in the bins, but no record counts them
    out = tmp_path / "out"
    out.mkdir()
    real_write_progress = fineweb.write_progress
    calls = []
    def interrupted(path, state):
        calls.append(state["documents_done"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write_progress(path, state)
    monkeypatch.setattr(fineweb, "write_progress", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fineweb.tokenize_and_write(as_dataset(docs), str(out), num_proc=2, docs_per_chunk=chunk, val_tokens=val_tokens)
    monkeypatch.setattr(fineweb, "write_progress", real_write_progress)
    with open(out / "progress_train_val.json") as f:
        state = json.load(f)
    assert state["documents_done"] == 2 * chunk and not state["complete"]
    assert os.path.getsize(out / "train.bin") > 2 * state["tokens"]["train"]  # the unrecorded chunk is there

    # run again: the first 80 documents are not read again (changing them changes nothing), the
    # unrecorded chunk is cut off and written again, and the bins equal the uninterrupted run's
    changed = ["something else entirely"] * (2 * chunk) + docs[2 * chunk:]
    capsys.readouterr()
    fineweb.tokenize_and_write(as_dataset(changed), str(out), num_proc=1, docs_per_chunk=chunk, val_tokens=val_tokens)
    assert "continuing at document 80 of 230" in capsys.readouterr().out
    for split in ("train", "val"):
        assert (out / f"{split}.bin").read_bytes() == (reference / f"{split}.bin").read_bytes()

    # a third run finds it complete and leaves it alone
    fineweb.tokenize_and_write(as_dataset(changed), str(out), num_proc=1, docs_per_chunk=chunk, val_tokens=val_tokens)
    assert "already complete" in capsys.readouterr().out
    assert (out / "train.bin").read_bytes() == (reference / "train.bin").read_bytes()


def test_refuses_to_continue_something_else(tmp_path, fineweb):
    docs = fake_documents()
    fineweb.tokenize_and_write(as_dataset(docs), str(tmp_path), num_proc=1, settings={"num_docs": None})
    before = read_bins(tmp_path)
    # other settings, another number of documents, bins shorter than the record, a damaged record
    cases = [
        (lambda: None, dict(settings={"num_docs": 100}), "other settings"),
        (lambda: None, dict(docs=docs[:-1], settings={"num_docs": None}), "other settings"),
        (lambda: os.truncate(tmp_path / "val.bin", 10), dict(settings={"num_docs": None}), "tokens but"),
        (lambda: (tmp_path / "progress_train_val.json").write_text("{not json"), dict(settings={"num_docs": None}), "damaged"),
    ]
    for damage, kwargs, message in cases:
        damage()
        with pytest.raises(SystemExit) as info:
            fineweb.tokenize_and_write(as_dataset(kwargs.get("docs", docs)), str(tmp_path), num_proc=1, settings=kwargs["settings"])
        text = str(info.value.code)
        assert text.startswith("error:") and message in text and "\n" not in text, text
    assert read_bins(tmp_path)["train"] == before["train"]  # nothing was overwritten


# -----------------------------------------------------------------------------
# main(): everything but the hub itself

@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """datasets.load_dataset answering for FineWeb-Edu with in-memory documents (a map-style Dataset,
    or an IterableDataset when streaming), and datasets' cache in tmp_path."""
    docs = fake_documents()
    asked = []
    def load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        asked.append(dict(path=path, name=name, split=split, streaming=streaming))
        ds = as_dataset(docs)
        return ds.to_iterable_dataset(num_shards=3) if streaming else ds
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return docs, asked


def test_main_full_subset(tmp_path, fineweb, fake_hub, capsys):
    docs, asked = fake_hub
    out = tmp_path / "out"
    out.mkdir()
    fineweb.main(["--num_proc=2", f"--val_tokens={VAL_TOKENS}"], folder=str(out))
    assert asked == [dict(path="HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train", streaming=False)]
    assert read_bins(out) == expected_bins(docs)
    assert fineweb.VAL_TOKENS == 100_000_000  # without --val_tokens: llm.c's and build-nanogpt's first shard
    assert f"({N_DOCS} documents)" in capsys.readouterr().out


def test_main_num_docs_streams_the_first_documents(tmp_path, fineweb, fake_hub):
    docs, asked = fake_hub
    out = tmp_path / "out"
    out.mkdir()
    fineweb.main(["--num_docs=150", "--num_proc=1"], folder=str(out))
    assert asked[0]["streaming"] is True
    assert read_bins(out) == expected_bins(docs[:150], val_tokens=10 * 150)  # ~1% of the tokens, as 100M is of 10B
    with pytest.raises(SystemExit) as info:  # the small version is not continued into the full one
        fineweb.main(["--num_proc=1"], folder=str(out))
    assert "other settings" in str(info.value.code)


@pytest.mark.parametrize("argv", [["--num_proc=1"], ["--num_docs=10", "--num_proc=1"]])
def test_main_offline_is_one_line(tmp_path, fineweb, monkeypatch, argv):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit) as info:
        fineweb.main(argv, folder=str(out))
    text = str(info.value.code)
    assert text.startswith("error: could not load HuggingFaceFW/fineweb-edu") and "\n" not in text
    assert os.listdir(out) == []


@pytest.mark.parametrize("argv", [["--num_docs=0"], ["--num_proc=0"], ["--val_tokens=0"]])
def test_main_rejects_bad_settings(tmp_path, fineweb, argv):
    with pytest.raises(SystemExit) as info:
        fineweb.main(argv, folder=str(tmp_path))
    assert str(info.value.code).startswith(f"error: {argv[0].split('=')[0]} must be >= 1")
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# the 124M recipe that trains on these bins

def test_gpt2_fineweb_config(tmp_path, monkeypatch):
    """config/train_gpt2_fineweb.py sets train.py settings that exist, to llm.c / build-nanogpt's recipe,
    with paths that do not depend on the working directory."""
    import train
    from configurator import apply_overrides
    monkeypatch.chdir(tmp_path)
    s = apply_overrides(dict(vars(train)), [os.path.join(REPO, "config", "train_gpt2_fineweb.py")])
    tokens_per_step = s["gradient_accumulation_steps"] * s["batch_size"] * s["block_size"]
    assert tokens_per_step == 2**19 and s["gradient_accumulation_steps"] % 8 == 0  # 8 GPUs divide it
    assert abs(s["max_iters"] * tokens_per_step - 10e9) < tokens_per_step  # one pass over the 10B tokens
    assert s["lr_decay_iters"] == s["max_iters"] and s["warmup_iters"] < s["max_iters"]
    assert (s["learning_rate"], s["min_lr"], s["weight_decay"], s["beta2"]) == (6e-4, 6e-5, 0.1, 0.95)
    assert s["dataset"] == "fineweb_edu" and s["data_root"] == os.path.join(REPO, "data")
    assert s["hellaswag_path"] == os.path.join(REPO, "data", "hellaswag", "hellaswag_val.jsonl")
    assert s["hellaswag_interval"] > 0 and s["eval_interval"] > 0


def test_speedrun_config_is_the_fineweb_recipe_with_the_speedrun_choices(tmp_path, monkeypatch):
    """config/speedrun_gpt2_fineweb.py: the same data, batch and evaluation as config/train_gpt2_fineweb.py, with
    Muon, rope, QK-norm and ReLU², settings that pass train.py's validation and make a valid 124M model."""
    from types import SimpleNamespace
    import train
    from configurator import apply_overrides
    from model import GPTConfig, PADDED_GPT2_VOCAB_SIZE
    monkeypatch.chdir(tmp_path)
    recipe = apply_overrides(dict(vars(train)), [os.path.join(REPO, "config", "train_gpt2_fineweb.py")])
    speedrun = apply_overrides(dict(vars(train)), [os.path.join(REPO, "config", "speedrun_gpt2_fineweb.py")])
    same = ("dataset", "data_root", "batch_size", "block_size", "gradient_accumulation_steps", "eval_interval",
            "eval_iters", "hellaswag_interval", "hellaswag_path")
    assert {k: speedrun[k] for k in same} == {k: recipe[k] for k in same}
    assert (speedrun["optimizer"], speedrun["rope"], speedrun["qk_norm"], speedrun["mlp_act"]) == ("muon", True, True, "relu2")
    assert speedrun["max_iters"] < recipe["max_iters"] and speedrun["lr_decay_iters"] == speedrun["max_iters"]
    settings = {k: speedrun[k] for k in vars(train) if k in speedrun}
    train.validate_settings(SimpleNamespace(**dict(settings, hellaswag_interval=0, out_dir=str(tmp_path / "out"))))
    config = GPTConfig(**{k: speedrun[k] for k in train.MODEL_SETTINGS}, vocab_size=PADDED_GPT2_VOCAB_SIZE)
    assert (config.n_layer, config.n_head, config.n_embd) == (12, 12, 768)
