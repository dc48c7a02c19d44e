"""
Every file the project reads, damaged the ways crashes, interrupted copies and other tools damage files, against
every script that reads it: the table of docs/errors.md, one test per cell. A damaged file ends in one line on
stderr that names it, exit status 1, no traceback and nothing written; a crash's torn last metrics line is skipped,
said, and the rest used.

The scripts run in this process (their main() through common.run_main, as `python script.py` runs it), on copies
of the files of one tiny run trained once for the module: what is tested is what the script says and writes, not
the interpreter starting.
"""

import io
import os
import json
import random
import shutil
from types import SimpleNamespace

import pytest
import torch

from helpers import assert_user_error, folder_digest, run_in_this_process, shakespeare_input, torchrun
from common import new_model
from checkpoint import load_checkpoint, sharded_path
from sharded_checkpoint import ShardedCheckpointer

TINY_RUN = ["--dataset=shakespeare_char", "--device=cpu", "--dtype=float32", "--compile=False", "--n_layer=1",
            "--n_head=2", "--n_embd=16", "--block_size=16", "--dropout=0.0", "--batch_size=2",
            "--gradient_accumulation_steps=1", "--max_iters=4", "--lr_decay_iters=4", "--warmup_iters=1",
            "--eval_interval=2", "--eval_iters=1", "--log_interval=1"]


# -----------------------------------------------------------------------------
# the files of one tiny run, made once

@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """data/shakespeare_char (bins, meta.json), a trained run (ckpt.pt, best.pt, metrics.jsonl), its export (a
    Hugging Face folder), its model as a sharded checkpoint (and with its optimizer, for a resume), a HellaSwag
    file, a config and a prompt file."""
    root = tmp_path_factory.mktemp("made")
    data = root / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    with open(shakespeare_input(), encoding="utf-8") as f:
        (data / "input.txt").write_text(f.read()[:20_000], encoding="utf-8")
    assert run_in_this_process("data/shakespeare_char/prepare.py", str(data)).returncode == 0
    run = root / "run"
    result = run_in_this_process("train.py", *TINY_RUN, f"--data_root={root / 'data'}", f"--out_dir={run}")
    assert result.returncode == 0, result.stderr
    result = run_in_this_process("export_hf.py", f"--out_dir={run}", f"--hf_dir={root / 'hf'}")
    assert result.returncode == 0, result.stderr

    checkpoint = load_checkpoint(str(run / "ckpt.pt"))
    model = new_model(checkpoint["model_args"])
    model.load_state_dict(checkpoint["model"])
    values = {k: v for k, v in checkpoint.items() if k not in ("model", "optimizer", "scaler") and not torch.is_tensor(v)}
    (root / "sharded").mkdir()
    ShardedCheckpointer().save(sharded_path(str(root / "sharded" / "ckpt.pt")), model, None, values)
    # what train.py resumes from also holds the optimizer (whose shards, read by no other script, follow the model's)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")  # train.py's AdamW
    optimizer.load_state_dict(checkpoint["optimizer"])
    (root / "sharded_run").mkdir()
    ShardedCheckpointer().save(sharded_path(str(root / "sharded_run" / "ckpt.pt")), model, optimizer, values)

    example = dict(ctx="A man is sitting on a roof. He", endings=["starts pulling up roofing.", "is ripping level tiles.",
                                                                 "is holding a rubik's cube.", "goes to the roof."], label=0)
    (root / "hellaswag.jsonl").write_text("".join(json.dumps(dict(example, ind=i)) + "\n" for i in range(3)))
    (root / "config.py").write_text("max_new_tokens = 5\nnum_samples = 1\n")
    (root / "prompt.txt").write_text("ROMEO:\n", encoding="utf-8")
    return root


@pytest.fixture
def cell(made, tmp_path):
    """A fresh copy of the made files for one cell."""
    shutil.copytree(made, tmp_path / "c")
    return tmp_path / "c"


# -----------------------------------------------------------------------------
# damages: each takes a file's path and leaves it damaged

def garbage_bytes(n):
    return random.Random(n).randbytes(n)


def missing(path):
    os.remove(path)


def empty(path):
    open(path, "wb").close()


def truncated(path):
    """Cut short, as an interrupted copy leaves it: its first half."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def cut_mid_record(path):
    """Cut inside its last record, as a crash mid-write leaves it: a text file inside its last line, a token bin
    inside a token."""
    with open(path, "rb") as f:
        data = f.read()
    end = len(data) - 1 if path.endswith(".bin") else data.rstrip(b"\n").rfind(b"\n") + 1 + 5
    with open(path, "wb") as f:
        f.write(data[:end])


def garbage(path):
    """Random bytes of the same size, as a failing disk or a wrong copy leaves it."""
    with open(path, "wb") as f:
        f.write(garbage_bytes(max(os.path.getsize(path), 64)))


def not_utf8(path):
    """Text in another encoding (Latin-1), as an editor on another system saves it."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write("# caf\u00e9 na\u00efve\n".encode("latin-1") + data)


def another_kind(source):
    """Another of the cell's files in its place (`source`, relative to the cell): a checkpoint where text is read,
    text where a checkpoint is, a pickle where JSON is."""
    def damage(path, cell):
        shutil.copy(os.path.join(cell, source), path)
    damage.__name__ = f"is_{source.replace('/', '_').replace('.', '_')}"
    damage.needs_cell = True
    return damage


def pickled(path, cell):
    """Another version's file: a pickle (what nanoGPT's meta.pkl and old checkpoints are) where JSON or a
    weights-only checkpoint is read."""
    import pickle
    with open(path, "wb") as f:
        pickle.dump({"vocab_size": 65, "itos": SimpleNamespace}, f)


def weights_only_state_dict(path, cell):
    """Another program's checkpoint: a bare state dict, without train.py's model_args."""
    torch.save({"transformer.wte.weight": torch.zeros(65, 16)}, path)


def another_program(path, cell):
    """JSON of another program (or a later version) where train.py's checkpoint.json is read."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"format": 2, "weights": "model.safetensors"}, f)


def another_architecture(path, cell):
    """A checkpoint whose model_args do not match its weights (another version of the model, or an edit)."""
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model_args"]["n_embd"] = 32
    torch.save(checkpoint, path)


for damage in (pickled, weights_only_state_dict, another_program, another_architecture):
    damage.needs_cell = True


# -----------------------------------------------------------------------------
# where each file is, and who reads it

def sharded_run(cell, script):
    """The sharded checkpoint that `script` reads: train.py's resume needs the optimizer's shards too."""
    return cell / ("sharded_run" if script == "train.py" else "sharded")


def files_of(cell, script):
    shards = next(p for p in (sharded_run(cell, script) / "ckpt.dcp").iterdir() if p.is_dir())
    return {
        "train.bin": cell / "data" / "shakespeare_char" / "train.bin",
        "val.bin": cell / "data" / "shakespeare_char" / "val.bin",
        "meta.json": cell / "data" / "shakespeare_char" / "meta.json",
        "ckpt.pt": cell / "run" / "ckpt.pt",
        "best.pt": cell / "run" / "best.pt",
        "checkpoint.json": sharded_run(cell, script) / "ckpt.dcp" / "checkpoint.json",
        ".metadata": shards / ".metadata",
        "shard": next(shards.glob("*.distcp")),
        "metrics.jsonl": cell / "run" / "metrics.jsonl",
        "config.json": cell / "hf" / "config.json",
        "model.safetensors": cell / "hf" / "model.safetensors",
        "tokenizer.json": cell / "hf" / "tokenizer.json",
        "hellaswag": cell / "hellaswag.jsonl",
        "config file": cell / "config.py",
        "prompt": cell / "prompt.txt",
        "input.txt": cell / "data" / "shakespeare_char" / "input.txt",
    }


# what the one line must name: the file, or the folder the script was pointed at
NAMED = {"checkpoint.json": "ckpt.dcp", ".metadata": "ckpt.dcp", "shard": "ckpt.dcp", "config.json": "hf",
         "model.safetensors": "hf", "tokenizer.json": "hf", "hellaswag": "hellaswag.jsonl", "config file": "config.py",
         "prompt": "prompt.txt"}


def command(script, file, cell):
    """The command line that makes `script` read `file` in the cell."""
    data = [f"--data_root={cell / 'data'}"]
    if file in ("checkpoint.json", ".metadata", "shard"):
        run, which = sharded_run(cell, script), "last"
    else:
        run, which = cell / "run", "last" if file == "ckpt.pt" else "auto"
    if file in ("config.json", "model.safetensors", "tokenizer.json"):
        source = [f"--init_from={cell / 'hf'}"]
    else:
        source = [f"--out_dir={run}", f"--checkpoint={which}"]
    if script == "train.py":
        if file in ("config.json", "model.safetensors", "tokenizer.json"):
            return [*TINY_RUN, *data, f"--init_from={cell / 'hf'}", f"--out_dir={cell / 'new'}"]
        if file == "hellaswag":  # HellaSwag is read by a GPT-2 BPE run: a data set without meta.json
            os.remove(cell / "data" / "shakespeare_char" / "meta.json")
            return [*TINY_RUN, *data, f"--out_dir={cell / 'new'}", "--hellaswag_interval=2",
                    f"--hellaswag_path={cell / 'hellaswag.jsonl'}"]
        if file in ("ckpt.pt", "checkpoint.json", ".metadata", "shard"):
            return [*TINY_RUN, *data, "--init_from=resume", f"--out_dir={run}", "--max_iters=6", "--lr_decay_iters=6"]
        return [*TINY_RUN, *data, f"--out_dir={cell / 'new'}"]
    if script == "sample.py":
        start = f"--start=FILE:{cell / 'prompt.txt'}"
        return [*source, "--device=cpu", "--max_new_tokens=2", "--num_samples=1", start]
    if script == "export_hf.py":
        return [*source, f"--hf_dir={cell / 'exported'}"]
    if script == "eval_hellaswag.py":
        return [*source, "--device=cpu", f"--data_path={cell / 'hellaswag.jsonl'}"]
    if script == "plot.py":
        return [str(run), f"--png={cell / 'runs.png'}"]
    if script.startswith("data/"):
        return [str(cell / "data" / "shakespeare_char")]
    raise AssertionError(script)


CHECKPOINT_READERS = ("sample.py", "export_hf.py", "eval_hellaswag.py")
ONE_FILE_CHECKPOINT_DAMAGES = (empty, truncated, garbage, another_kind("run/metrics.jsonl"), pickled,
                               weights_only_state_dict, another_architecture)
TEXT_DAMAGES = (empty, truncated, garbage, not_utf8)

CELLS = [
    *[(f, damage, "train.py") for f in ("train.bin", "val.bin")
      for damage in (missing, empty, cut_mid_record, garbage, another_kind("data/shakespeare_char/input.txt"))],
    *[("meta.json", damage, "train.py") for damage in (empty, truncated, garbage, not_utf8, another_kind("run/ckpt.pt"), pickled)],
    *[("ckpt.pt", damage, script) for script in ("train.py", *CHECKPOINT_READERS)
      for damage in (missing, *ONE_FILE_CHECKPOINT_DAMAGES)],
    *[("best.pt", damage, script) for script in CHECKPOINT_READERS for damage in ONE_FILE_CHECKPOINT_DAMAGES],
    *[("checkpoint.json", damage, script) for script in ("train.py", *CHECKPOINT_READERS)
      for damage in (missing, *TEXT_DAMAGES, another_kind("run/ckpt.pt"), another_program)],
    *[(f, damage, script) for f in (".metadata", "shard") for script in ("train.py", *CHECKPOINT_READERS)
      for damage in (missing, empty, truncated, garbage)],
    *[("metrics.jsonl", damage, "plot.py") for damage in (missing, empty, garbage, not_utf8, another_kind("run/ckpt.pt"))],
    *[(f, damage, script) for f in ("config.json", "model.safetensors", "tokenizer.json")
      for script in ("train.py", "sample.py", "eval_hellaswag.py")
      for damage in ((missing, *TEXT_DAMAGES) if f != "tokenizer.json" else TEXT_DAMAGES)],
    *[("hellaswag", damage, script) for script in ("eval_hellaswag.py", "train.py")
      for damage in (missing, empty, cut_mid_record, garbage, not_utf8, another_kind("run/ckpt.pt"))],
    *[("prompt", damage, "sample.py") for damage in (missing, empty, garbage, not_utf8, another_kind("run/ckpt.pt"))],
    *[("input.txt", damage, script) for script in ("data/shakespeare_char/prepare.py", "data/shakespeare/prepare.py")
      for damage in (empty, garbage, not_utf8, another_kind("run/ckpt.pt"))],
]


@pytest.mark.parametrize("file, damage, script", CELLS,
                         ids=[f"{file}-{damage.__name__}-{script}" for file, damage, script in CELLS])
def test_damaged_file_is_one_line_and_nothing_written(cell, file, damage, script):
    args = command(script, file, cell)
    path = str(files_of(cell, script)[file])
    if getattr(damage, "needs_cell", False):
        damage(path, str(cell))
    else:
        damage(path)
    before = folder_digest(cell)
    result = run_in_this_process(script, *args)
    assert_user_error(result, NAMED.get(file, file), *SAYS.get((file, damage.__name__), ()))
    assert folder_digest(cell) == before, "a file was written or changed"


# what is wrong, where a reader once said something else (a traceback, another file, a misleading reason)
SAYS = {
    **{(f, "cut_mid_record"): ["not a whole number of 2-byte tokens"] for f in ("train.bin", "val.bin")},
    **{(f, d): ["is not a checkpoint"] for f in ("ckpt.pt", "best.pt") for d in ("garbage", "is_run_metrics_jsonl")},
    ("checkpoint.json", "missing"): ["has no checkpoint.json"],
    ("checkpoint.json", "another_program"): ["not a sharded checkpoint written by train.py"],
    (".metadata", "missing"): [".metadata", "is missing"],
    ("shard", "missing"): ["missing shard file(s) __0_0.distcp"],
    ("config.json", "missing"): ["no config.json", "export_hf.py"],
    ("model.safetensors", "garbage"): ["restore it from a backup or export it again"],
    ("prompt", "empty"): ["prompt file", "is empty"],
    **{("input.txt", d): ["is not UTF-8 text"] for d in ("garbage", "not_utf8", "is_run_ckpt_pt")},
}


@pytest.mark.parametrize("script", ["train.py", *CHECKPOINT_READERS])
def test_the_whole_sharded_checkpoint_is_read(cell, script):
    """The cells above fail on the damage, not on the made checkpoint: whole, every reader takes it (and
    eval_hellaswag.py, having read it, refuses a character-level model)."""
    result = run_in_this_process(script, *command(script, "checkpoint.json", cell))
    if script == "eval_hellaswag.py":
        assert "character-level model" in assert_user_error(result)
    else:
        assert result.returncode == 0, result.stderr
    assert ("init_from=resume at step 4" if script == "train.py" else "ckpt.dcp (step 4") in result.stdout + result.stderr


# every script reads its settings through the configurator: a damaged config file, for each
CONFIG_READERS = ("train.py", "sample.py", "export_hf.py", "eval_hellaswag.py", "bench.py")  # plot.py takes runs
CONFIG_CELLS = [(damage, script) for script in CONFIG_READERS
                for damage in (missing, truncated, garbage, not_utf8, another_kind("run/ckpt.pt"))]


@pytest.mark.parametrize("damage, script", CONFIG_CELLS, ids=[f"{d.__name__}-{s}" for d, s in CONFIG_CELLS])
def test_damaged_config_file(cell, damage, script):
    path = str(cell / "config.py")
    if getattr(damage, "needs_cell", False):
        damage(path, str(cell))
    else:
        damage(path)
    before = folder_digest(cell)
    result = run_in_this_process(script, path, f"--out_dir={cell / 'run'}")
    assert_user_error(result, "config.py")
    assert folder_digest(cell) == before


# -----------------------------------------------------------------------------
# metrics.jsonl torn by a crash: drawn from what is whole, and whole again after a resume

def tear_last_record(path):
    """What SIGKILL mid-write leaves: the last record cut inside, no newline after it."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:data.rstrip(b"\n").rfind(b"\n") + 1] + data[data.rstrip(b"\n").rfind(b"\n") + 1:][:12])


def test_plot_draws_a_run_whose_last_record_a_crash_tore(cell):
    metrics = cell / "run" / "metrics.jsonl"
    whole = len(metrics.read_text().splitlines())
    tear_last_record(metrics)
    result = run_in_this_process("plot.py", str(cell / "run"), f"--png={cell / 'runs.png'}")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"metrics.jsonl, line {whole}: skipped a record cut short" in result.stderr
    assert (cell / "runs.png").stat().st_size > 0


def test_plot_refuses_a_damaged_line_before_the_last(cell):
    metrics = cell / "run" / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    lines[2] = garbage_bytes(40) + b"\n"
    metrics.write_bytes(b"".join(lines))
    before = folder_digest(cell)
    assert_user_error(run_in_this_process("plot.py", str(cell / "run"), f"--png={cell / 'runs.png'}"),
                      "metrics.jsonl, line 3: not JSON")
    assert folder_digest(cell) == before


def test_resume_after_a_torn_record_starts_a_line_of_its_own(cell):
    metrics = cell / "run" / "metrics.jsonl"
    tear_last_record(metrics)
    torn = metrics.read_bytes()
    result = run_in_this_process("train.py", *TINY_RUN, f"--data_root={cell / 'data'}", "--init_from=resume",
                            f"--out_dir={cell / 'run'}", "--max_iters=6", "--lr_decay_iters=6")
    assert result.returncode == 0, result.stderr
    assert "cut short: the next one starts on a line of its own" in result.stderr
    lines = metrics.read_bytes()[len(torn):].decode().splitlines()
    assert lines[0] == "" and all(json.loads(line) for line in lines[1:])  # the torn line ended, then whole records
    assert any(r.get("iter") == 6 for r in map(json.loads, lines[1:]))
    result = run_in_this_process("plot.py", str(cell / "run"), f"--png={cell / 'runs.png'}")
    assert result.returncode == 0 and "skipped a record cut short" in result.stderr, result.stderr


def test_eval_hellaswag_after_a_torn_record_starts_a_line_of_its_own(cell):
    os.remove(cell / "data" / "shakespeare_char" / "meta.json")  # HellaSwag scores a GPT-2 BPE model
    run = cell / "bpe"
    result = run_in_this_process("train.py", *TINY_RUN, f"--data_root={cell / 'data'}", f"--out_dir={run}",
                            "--max_iters=2", "--lr_decay_iters=2")
    assert result.returncode == 0, result.stderr
    metrics = run / "metrics.jsonl"
    tear_last_record(metrics)
    torn = metrics.read_bytes()
    result = run_in_this_process("eval_hellaswag.py", f"--out_dir={run}", "--device=cpu",
                            f"--data_path={cell / 'hellaswag.jsonl'}")
    assert result.returncode == 0, result.stderr
    lines = metrics.read_bytes()[len(torn):].decode().splitlines()
    assert lines[0] == "" and len(lines) == 2, lines  # the torn line ended, then its own record, whole
    assert json.loads(lines[1])["event"] == "hellaswag"


# -----------------------------------------------------------------------------
# a prepare script that would download its input, offline

class Offline:
    """requests.get as it fails without a network (raised), or with a server that answers an error status."""

    def __init__(self, answers):
        self.answers = answers

    def __call__(self, url, **kwargs):
        import requests
        if not self.answers:
            raise requests.ConnectionError(f"no network for {url}")
        response = requests.Response()
        response.status_code, response.url, response.raw = 404, url, io.BytesIO(b"Not Found")
        return response


DOWNLOADS = [(script, named, answers) for script, named in (("data/shakespeare_char/prepare.py", "input.txt"),
                                                             ("data/shakespeare/prepare.py", "input.txt"),
                                                             ("data/hellaswag/prepare.py", "hellaswag_val.jsonl"))
             for answers in (False, True)]


@pytest.mark.parametrize("script, named, answers", DOWNLOADS,
                         ids=[f"{s.split('/')[1]}-{'404' if a else 'offline'}" for s, _, a in DOWNLOADS])
def test_missing_input_that_cannot_be_downloaded_is_one_line(cell, monkeypatch, script, named, answers):
    import requests
    monkeypatch.setattr(requests, "get", Offline(answers))
    folder = cell / "data" / script.split("/")[1]
    folder.mkdir(exist_ok=True)
    if (folder / "input.txt").exists():
        os.remove(folder / "input.txt")
    before = folder_digest(cell)
    result = run_in_this_process(script, str(folder))
    assert_user_error(result, "could not download", named, str(folder))
    assert folder_digest(cell) == before


# -----------------------------------------------------------------------------
# under torchrun: every rank meets the damage, the line is printed once

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp_resume_with_a_shard_file_missing_is_one_line_from_every_rank(cell):
    out = cell / "fsdp"
    args = ["train.py", *TINY_RUN, f"--data_root={cell / 'data'}", f"--out_dir={out}", "--fsdp=True",
            "--gradient_accumulation_steps=2", "--max_iters=2", "--eval_interval=2"]
    first = torchrun(2, *args, timeout=120)
    assert first.returncode == 0, first.stderr
    shards = next(p for p in (out / "ckpt.dcp").iterdir() if p.is_dir())
    os.remove(shards / "__1_0.distcp")
    before = folder_digest(out)
    result = torchrun(2, *args, "--init_from=resume", "--max_iters=4", "--lr_decay_iters=4", timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("missing shard file(s) __1_0.distcp") == 1, result.stderr
    # torchrun's agent ends with its own ChildFailedError summary; no worker shows a traceback
    assert 'train.py", line' not in result.stderr and "CheckpointException" not in result.stderr, result.stderr
    assert folder_digest(out) == before
