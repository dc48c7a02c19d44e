"""
checkpoint.py and durable.py: where a checkpoint is written and read (best.pt holds the best-validated weights
and a stop never replaces it; the scripts read best.pt, --checkpoint=last reads ckpt.pt), one file written so
that a kill at any moment leaves the previous one whole, loaded with weights only (a crafted, a truncated or a
mismatched file is one clear line and changes nothing), what a resume adopts from the checkpoint and what it
refuses, and a full disk as one line with the previous checkpoint intact.
"""

import os
import sys
import stat
import signal
import shutil
import subprocess

import pytest
import torch

import durable
from helpers import (REPO, STOPPED_EXIT, RunsCode, assert_user_error, file_bytes, fill, folder_digest, load_saved, losses,
                     read_metrics, run_script, script_env, start_run, stop_after, tiny_run_args, watchdog)


# ---- best vs last ----------------------------------------------------------------------------------

def test_best_pt_holds_the_best_validated_weights_and_a_stop_never_replaces_it(data_root, tmp_path):
    out = str(tmp_path / "run")
    # a learning rate high enough that the validation loss does not improve at every evaluation
    args = tiny_run_args(data_root, out, "--max_iters=40", "--eval_interval=4", "--learning_rate=3e-2", "--decay_lr=False")
    proc = start_run(args)
    stdout, stderr = stop_after(proc, "iter 17:", signal.SIGTERM)
    assert proc.returncode == STOPPED_EXIT, stderr
    vals = {r["iter"]: r["val_loss"] for r in read_metrics(out) if "val_loss" in r}
    best_step = min(vals, key=vals.get)
    best = load_saved(out, "best.pt")
    assert (best["iter_num"], best["val_loss"]) == (best_step, vals[best_step])
    assert "optimizer" not in best  # the weights alone
    stopped = load_saved(out, "ckpt.pt")
    assert stopped["iter_num"] > max(vals) and stopped["evaluated"] is False
    assert any(not torch.equal(best["model"][k], stopped["model"][k]) for k in best["model"])
    # the scripts that use a trained model read best.pt and say so; --checkpoint=last reads ckpt.pt
    sample = run_script("sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=5",
                        check=True)
    assert f"best.pt (step {best_step}," in sample.stderr
    last = run_script("sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=5",
                      "--checkpoint=last", check=True)
    assert f"ckpt.pt (step {stopped['iter_num']}" in last.stderr
    # resuming to the end never writes a worse best.pt: it holds the lowest val loss of the whole run
    before = file_bytes(os.path.join(out, "best.pt"))
    run_script(*args, "--init_from=resume", "--max_iters=24", check=True)
    vals = {r["iter"]: r["val_loss"] for r in read_metrics(out) if "val_loss" in r}
    best = load_saved(out, "best.pt")
    assert best["val_loss"] == min(vals.values())
    if best["iter_num"] == best_step:
        assert file_bytes(os.path.join(out, "best.pt")) == before



# ---- one file: written atomically, loaded with weights only ----------------------------------------

# Writes checkpoints 1, 2, 3 with checkpoint.save_checkpoint and stops dead inside the write of `stall_at`, at a
# chosen point: after part of torch.save's bytes ("bytes"), or with the file written and synced but not yet
# renamed into place ("rename"). It says so on stdout, and waits there to be killed.
CHILD_WRITER = r"""
import os, sys, time, torch
sys.path.insert(0, {repo!r})
import checkpoint, durable
version = 0

def stall(where):
    print("stalled " + where, flush=True)
    time.sleep(3600)

class StallingFile:
    def __init__(self, f):
        self.f, self.written = f, 0
    def write(self, data):
        n = self.f.write(data)
        self.written += len(data)
        if version == {stall_at} and {where!r} == "bytes" and self.written > 4_000_000:
            self.f.flush()
            stall("bytes")
        return n
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

real_open, real_replace = open, os.replace
def opening(path, mode="r", *a, **k):
    f = real_open(path, mode, *a, **k)
    return StallingFile(f) if "w" in mode else f
durable.open = opening
def replace(src, dst):
    if version == {stall_at} and {where!r} == "rename":
        stall("rename")
    real_replace(src, dst)
durable.os.replace = replace
for version in range(1, {stall_at} + 1):
    checkpoint.save_checkpoint(dict(version=version, data=torch.full((2_000_000,), float(version))), {path!r})
    print(version, flush=True)
"""


@pytest.mark.parametrize("where", ["bytes", "rename"])
def test_sigkill_during_checkpoint_write_never_tears_the_file(tmp_path, where):
    """A kill inside a checkpoint write, at a point the child reports (not a random moment), leaves the previous
    checkpoint whole."""
    path = str(tmp_path / "ckpt.pt")
    proc = subprocess.Popen([sys.executable, "-c", CHILD_WRITER.format(repo=REPO, path=path, stall_at=3, where=where)],
                            stdout=subprocess.PIPE, text=True, env=script_env())
    with watchdog(proc, 120):
        lines = [proc.stdout.readline().strip() for _ in range(3)]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert lines == ["1", "2", f"stalled {where}"], lines
    assert os.path.getsize(path + ".tmp") > 4_000_000  # the new checkpoint was being written
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["version"] == 2 and torch.all(checkpoint["data"] == 2.0)


def test_an_atomic_write_is_synced_then_renamed_then_the_rename_synced(tmp_path, monkeypatch):
    """What a kill cannot show but a power cut would: the new file's bytes reach the disk before the rename makes
    it the file, and the rename itself is made durable by syncing the folder."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("sync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else f"sync file of {os.fstat(fd).st_size} bytes")
        real_fsync(fd)

    def replace(src, dst):
        events.append(f"rename {os.path.basename(src)} -> {os.path.basename(dst)}")
        real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    durable.write_atomically(str(path), lambda f: f.write(b"new bytes"))
    assert events == ["sync file of 9 bytes", "rename ckpt.pt.tmp -> ckpt.pt", "sync folder"]
    assert path.read_bytes() == b"new bytes" and os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_checkpoint_crafted_to_run_code_is_refused(data_root, tmp_path, script):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "code_ran"
    torch.save({"model": RunsCode(str(marker)), "model_args": {}}, out / "ckpt.pt")
    args = (tiny_run_args(data_root, str(out), "--init_from=resume") if script == "train.py"
            else ["sample.py", f"--out_dir={out}", "--max_new_tokens=5"])
    before = folder_digest(str(out))
    line = assert_user_error(run_script(*args), "refused")
    assert not marker.exists(), "loading the checkpoint ran code"
    assert folder_digest(str(out)) == before
    assert "ckpt.pt" in line


def test_truncated_checkpoint_is_a_clear_error(data_root, tmp_path):
    out = str(tmp_path)
    run_script(*tiny_run_args(data_root, out, "--max_iters=4", "--eval_interval=4"), check=True)
    path = os.path.join(out, "ckpt.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    before = folder_digest(out)
    assert_user_error(run_script(*tiny_run_args(data_root, out, "--init_from=resume", "--max_iters=8")), "corrupt")
    assert_user_error(run_script("sample.py", f"--out_dir={out}", "--max_new_tokens=5", "--checkpoint=last"), "corrupt")
    assert folder_digest(out) == before


def test_checkpoint_of_another_architecture_lists_mismatched_names(data_root, tmp_path):
    out = str(tmp_path)
    run_script(*tiny_run_args(data_root, out, "--max_iters=4", "--eval_interval=4"), check=True)
    path = os.path.join(out, "ckpt.pt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model_args"]["n_embd"] = 64  # the weights are 32 wide
    torch.save(checkpoint, path)
    before = folder_digest(out)
    for args in (tiny_run_args(data_root, out, "--init_from=resume", "--max_iters=8", "--n_embd=64"),
                 ["sample.py", f"--out_dir={out}", "--max_new_tokens=5", "--checkpoint=last"]):
        line = assert_user_error(run_script(*args), "transformer.wte.weight")
        assert "(65, 32)" in line and "(65, 64)" in line
    assert folder_digest(out) == before


def test_sample_decodes_with_the_checkpoints_own_vocabulary_from_any_folder(existing_run, tmp_path):
    """The character list travels in ckpt.pt, so sampling works away from the data folder."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), f"--out_dir={existing_run}",
                             "--max_new_tokens=30", "--num_samples=1", "--stream=False", "--start=ROMEO:"],
                            cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout.split("---------------")[0]
    assert text.startswith("ROMEO:") and len(text.rstrip("\n")) >= len("ROMEO:") + 25
    assert torch.load(os.path.join(existing_run, "ckpt.pt"), weights_only=True)["chars"][:3] == ["\n", " ", "!"]



# ---- what a resume adopts and what it refuses ------------------------------------------------------

@pytest.fixture(scope="module")
def six_steps(data_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("six"))
    run_script(*tiny_run_args(data_root, out, "--max_iters=6", "--eval_interval=3"), check=True)
    return out


def test_resume_refuses_another_architecture_naming_each_field(data_root, six_steps, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(six_steps, out)
    before = folder_digest(out)
    result = run_script(*tiny_run_args(data_root, out, "--init_from=auto", "--max_iters=8", "--n_layer=3", "--n_kv_head=1"))
    line = assert_user_error(result, "--n_layer=3 but the checkpoint has 2", "--n_kv_head=1 but the checkpoint has 2")
    assert "n_embd" not in line  # only the fields that differ
    assert folder_digest(out) == before


def test_resume_takes_unset_architecture_from_the_checkpoint(data_root, six_steps, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(six_steps, out)
    # no model settings at all: the defaults (12 layers, 768 wide, block 1024) are not the checkpoint's
    result = run_script("train.py", "--init_from=resume", f"--out_dir={out}", f"--data_root={data_root}",
                        "--dataset=shakespeare_char", "--device=cpu", "--dtype=float32", "--compile=False",
                        "--batch_size=4", "--gradient_accumulation_steps=1", "--max_iters=8", "--eval_interval=3",
                        "--eval_iters=2", check=True)
    assert "init_from=resume at step 6" in result.stdout
    assert load_saved(out, "ckpt.pt")["model_args"] == load_saved(six_steps, "ckpt.pt")["model_args"]
    assert load_saved(out, "ckpt.pt")["config"]["n_layer"] == 2  # the run's settings describe the model it trains


def test_resume_honours_a_changed_dropout_and_says_what_changed(data_root, six_steps, tmp_path):
    runs = {}
    for dropout in (0.0, 0.2):
        out = str(tmp_path / f"p{int(dropout * 10)}")
        shutil.copytree(six_steps, out)
        result = run_script(*tiny_run_args(data_root, out, "--init_from=resume", "--max_iters=9", "--eval_interval=3",
                                        f"--dropout={dropout}"), check=True)
        runs[dropout] = (out, result.stdout)
    out, stdout = runs[0.2]
    assert "changed since the checkpoint's run: " in stdout and "dropout 0.0 -> 0.2" in stdout
    assert "max_iters 6 -> 9" in stdout
    assert load_saved(out, "ckpt.pt")["model_args"]["dropout"] == 0.2
    changes = next(line for line in runs[0.0][1].splitlines() if line.startswith("changed since"))
    assert "max_iters 6 -> 9" in changes and "dropout" not in changes
    with_dropout, without = losses(out), losses(runs[0.0][0])
    assert [with_dropout[s] for s in range(6)] == [without[s] for s in range(6)]
    assert all(with_dropout[s] != without[s] for s in range(6, 9))  # the dropout was applied



# ---- a full disk -----------------------------------------------------------------------------------

def test_full_disk_mid_run_is_one_line_and_keeps_the_last_checkpoint(data_root, small_disk):
    out = os.path.join(small_disk, "run")
    proc = start_run(tiny_run_args(data_root, out, "--max_iters=20", "--eval_interval=4", "--n_embd=64"))
    for line in proc.stdout:
        if line.startswith("iter 5:"):  # the checkpoint of step 4 is written; the next comes at step 8
            fill(small_disk, leave=64 * 1024)  # room for metrics lines, not for a checkpoint
            break
    stdout, stderr = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    line = assert_user_error(result, "ckpt.pt", "No space left on device", "MiB")
    assert "needs about" in line
    assert sorted(os.listdir(out)) == ["best.pt", "ckpt.pt", "metrics.jsonl"]  # no temporary file left
    assert load_saved(out, "ckpt.pt")["iter_num"] == 4
    read_metrics(out)  # every line still one JSON object

