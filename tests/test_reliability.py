"""
Reliability: exact resume, crash-safe checkpoints, preemption, safe loading, and one clear line for
every mistake a user can make. The reference for resume is always a run that never stopped.
"""

import os
import sys
import json
import time
import signal
import random
import hashlib
import threading
import contextlib
import subprocess

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_TRAIN_ARGS, assert_user_error, read_metrics, run_script, script_env


PROCESS_TIMEOUT = 240  # seconds a child may run before the test kills it and fails


@contextlib.contextmanager
def watchdog(proc, seconds=PROCESS_TIMEOUT):
    """Kills proc if it is still running after `seconds`, so that a hung child fails the test instead of
    hanging the suite (reading its output line by line has no timeout of its own)."""
    expired = []
    timer = threading.Timer(seconds, lambda: (expired.append(True), proc.kill()))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    assert not expired, f"{proc.args} ran longer than {seconds} s and was killed"


def train_args(data_root, out_dir, *extra):
    return [*TINY_TRAIN_ARGS, f"--data_root={data_root}", f"--out_dir={out_dir}", *extra]


def losses(out_dir):
    """Training loss per step; a step re-run after a crash counts once, with its last value."""
    return {r["iter"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def snapshot(folder):
    """Name -> sha256 of every file under folder: to prove an error changed nothing."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """An uninterrupted 24-step run with dropout (so the RNG state matters), a checkpoint every 4 steps."""
    out = str(tmp_path_factory.mktemp("reference"))
    run_script(*train_args(data_root, out, "--max_iters=24", "--eval_interval=4", "--dropout=0.1"), check=True)
    return out


def test_resume_is_bitwise_exact(data_root, reference, tmp_path):
    out = str(tmp_path)
    run_script(*train_args(data_root, out, "--max_iters=12", "--eval_interval=4", "--dropout=0.1"), check=True)
    first_part = os.path.getsize(os.path.join(out, "metrics.jsonl"))
    run_script(*train_args(data_root, out, "--max_iters=24", "--eval_interval=4", "--dropout=0.1", "--init_from=resume"), check=True)
    assert losses(out) == losses(reference)
    assert_same_weights(weights(out), weights(reference))
    # metrics.jsonl was appended to, not truncated: the first run's lines are still its first lines
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert len(f.read()) > first_part
    checkpoint = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    for key in ("model", "optimizer", "scaler", "iter_num", "best_val_loss", "config", "model_args"):
        assert key in checkpoint
    assert checkpoint["iter_num"] == 24


@pytest.mark.slow  # several restarts of a training process (~30 s)
def test_sigkill_at_random_moments_then_resume(data_root, reference, tmp_path):
    out = str(tmp_path)
    args = train_args(data_root, out, "--max_iters=24", "--eval_interval=4", "--dropout=0.1")
    rng = random.Random(0)
    kills = 0
    for _ in range(20):
        resume = os.path.exists(os.path.join(out, "ckpt.pt"))
        proc = subprocess.Popen([sys.executable, *args, *(["--init_from=resume"] if resume else [])], cwd=REPO,
                                env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        # kill after a random number of logged steps plus a random few milliseconds: mid-step, mid-eval
        # or mid-checkpoint; the timing follows the run's progress, not the machine's speed
        target, seen = rng.randint(3, 9), 0
        with watchdog(proc):
            for line in proc.stdout:
                seen += line.startswith("iter ")
                if seen == target:
                    time.sleep(rng.uniform(0.0, 0.03))
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
                    break
            proc.stdout.close()
            proc.wait(timeout=PROCESS_TIMEOUT)
        if os.path.exists(os.path.join(out, "ckpt.pt")):  # never a torn file, whenever the kill came
            assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] % 4 == 0
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, "the run never finished"
    assert kills >= 3
    assert losses(out) == losses(reference)
    assert_same_weights(weights(out), weights(reference))


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


def test_sigterm_saves_a_checkpoint_that_resumes_exactly(data_root, reference, tmp_path):
    out = str(tmp_path)
    args = train_args(data_root, out, "--max_iters=24", "--eval_interval=4", "--dropout=0.1")
    # SIGTERM once step 9 is logged: the run stops at the next step boundary, between two checkpoints
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with watchdog(proc):
        for line in proc.stdout:
            if line.startswith("iter 9:"):
                proc.send_signal(signal.SIGTERM)
                break
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stderr  # stopped on request: resume me
    assert "SIGTERM" in stderr and "--init_from=resume" in stdout
    stopped_at = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"]
    assert 10 <= stopped_at < 24
    run_script(*args, "--init_from=resume", check=True)
    assert losses(out) == losses(reference)
    assert_same_weights(weights(out), weights(reference))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_root, tmp_path):
    out = str(tmp_path)
    run_script(*train_args(data_root, out, "--max_iters=4", "--eval_interval=4"), check=True)
    result = run_script(*train_args(data_root, out, "--init_from=resume", "--max_iters=200", "--eval_interval=1",
                                    "--learning_rate=1e6", "--grad_clip=0.0", "--decay_lr=False"))
    line = assert_user_error(result, "step")
    assert "nan" in line or "inf" in line
    failed_at = int(line.split(" at step ")[1].split(";")[0])
    checkpoint = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)  # the last one written before it
    assert checkpoint["iter_num"] <= failed_at
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


# ---- safe loading ---------------------------------------------------------------------------------

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_checkpoint_crafted_to_run_code_is_refused(data_root, tmp_path, script):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "code_ran"
    torch.save({"model": RunsCode(str(marker)), "model_args": {}}, out / "ckpt.pt")
    args = (train_args(data_root, str(out), "--init_from=resume") if script == "train.py"
            else ["sample.py", f"--out_dir={out}", "--max_new_tokens=5"])
    before = snapshot(str(out))
    line = assert_user_error(run_script(*args), "refused")
    assert not marker.exists(), "loading the checkpoint ran code"
    assert snapshot(str(out)) == before
    assert "ckpt.pt" in line


def test_truncated_checkpoint_is_a_clear_error(data_root, tmp_path):
    out = str(tmp_path)
    run_script(*train_args(data_root, out, "--max_iters=4", "--eval_interval=4"), check=True)
    path = os.path.join(out, "ckpt.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    before = snapshot(out)
    assert_user_error(run_script(*train_args(data_root, out, "--init_from=resume", "--max_iters=8")), "corrupt")
    assert_user_error(run_script("sample.py", f"--out_dir={out}", "--max_new_tokens=5", "--checkpoint=last"), "corrupt")
    assert snapshot(out) == before


def test_checkpoint_of_another_architecture_lists_mismatched_names(data_root, tmp_path):
    out = str(tmp_path)
    run_script(*train_args(data_root, out, "--max_iters=4", "--eval_interval=4"), check=True)
    path = os.path.join(out, "ckpt.pt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model_args"]["n_embd"] = 64  # the weights are 32 wide
    torch.save(checkpoint, path)
    before = snapshot(out)
    for args in (train_args(data_root, out, "--init_from=resume", "--max_iters=8", "--n_embd=64"),
                 ["sample.py", f"--out_dir={out}", "--max_new_tokens=5", "--checkpoint=last"]):
        line = assert_user_error(run_script(*args), "transformer.wte.weight")
        assert "(65, 32)" in line and "(65, 64)" in line
    assert snapshot(out) == before


# ---- one clear line for every user mistake, and nothing changed ------------------------------------

@pytest.fixture()
def existing_run(data_root, tmp_path_factory):
    """An out_dir holding a real checkpoint and metrics, to prove a failing command leaves it alone."""
    out = str(tmp_path_factory.mktemp("existing"))
    run_script(*train_args(data_root, out, "--max_iters=2", "--eval_interval=2"), check=True)
    return out


def write_dataset(root, name, tokens, vocab_size=None):
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    for split in ("train", "val"):
        np.array(tokens, dtype=np.uint16).tofile(os.path.join(folder, f"{split}.bin"))
    if vocab_size is not None:
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump(dict(vocab_size=vocab_size, itos={}, stoi={}), f)


BAD_INPUTS = {
    "n_embd not divisible by n_head": (["--n_embd=30", "--n_head=4"], ["n_embd", "n_head"]),
    "n_head not divisible by n_kv_head": (["--n_head=4", "--n_kv_head=3"], ["n_kv_head"]),
    "window below 1": (["--window=0"], ["window"]),
    "odd head dim with rope": (["--n_embd=30", "--n_head=2", "--rope=True"], ["rope", "even"]),
    "unknown key": (["--n_layr=3"], ["n_layr", "n_layer"]),
    "mistyped value": (["--batch_size=four"], ["batch_size", "int"]),
    "missing config file": (["config/no_such_config.py"], ["no_such_config.py", "does not exist"]),
    "resume with no checkpoint": (["--init_from=resume", "--out_dir={tmp}/empty"], ["no checkpoint"]),
    "unknown init_from": (["--init_from=gpt3"], ["init_from"]),
    "eval_interval of zero": (["--eval_interval=0"], ["eval_interval", ">= 1"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_changes_nothing(data_root, existing_run, tmp_path, case):
    extra, needles = BAD_INPUTS[case]
    extra = [e.format(tmp=tmp_path) for e in extra]
    before = snapshot(existing_run)
    result = run_script(*train_args(data_root, existing_run, "--max_iters=4"), *extra)
    assert_user_error(result, *needles)
    assert snapshot(existing_run) == before


def test_config_file_that_fails_to_run(data_root, existing_run, tmp_path):
    bad = tmp_path / "bad_config.py"
    bad.write_text("batch_size = 1 / 0\n")
    before = snapshot(existing_run)
    assert_user_error(run_script(*train_args(data_root, existing_run), str(bad)), "bad_config.py", "ZeroDivisionError")
    assert snapshot(existing_run) == before


def test_missing_dataset_bins(data_root, tmp_path):
    out = tmp_path / "out"
    result = run_script(*train_args(data_root, str(out), "--dataset=no_such_set"))
    assert_user_error(result, "data/no_such_set/prepare.py")
    assert not out.exists()


def test_dataset_shorter_than_block_size(tmp_path):
    write_dataset(str(tmp_path), "short", list(range(20)), vocab_size=65)
    out = tmp_path / "out"
    result = run_script(*train_args(str(tmp_path), str(out), "--dataset=short"))  # block_size 32 > 20 tokens
    assert_user_error(result, "block_size")
    assert not out.exists()


def test_token_ids_not_below_vocab_size(tmp_path):
    write_dataset(str(tmp_path), "badids", [1, 2, 3, 70] * 40, vocab_size=65)
    out = tmp_path / "out"
    assert_user_error(run_script(*train_args(str(tmp_path), str(out), "--dataset=badids")), "70", "vocab_size")
    assert not out.exists()


def test_block_size_larger_than_pretrained(data_root, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    hf_dir = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(hf_dir)
    out = tmp_path / "out"
    result = run_script(*train_args(data_root, str(out), f"--init_from={hf_dir}", "--dataset=shakespeare", "--block_size=64"))
    assert_user_error(result, "block_size=64", "32")
    assert not out.exists()


def test_out_dir_that_is_a_file(data_root, tmp_path):
    out = tmp_path / "a_file"
    out.write_text("keep me")
    assert_user_error(run_script(*train_args(data_root, str(out))), "out_dir", "file")
    assert out.read_text() == "keep me"


def test_accumulation_that_does_not_divide_the_world_size(data_root, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *train_args(data_root, str(out), "--gradient_accumulation_steps=3")],
                            cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "gradient_accumulation_steps=3" in result.stderr and "multiple of 2" in result.stderr
    assert not out.exists()


def test_eval_only_on_a_checkpoint_evaluates_and_changes_no_checkpoint(data_root, existing_run):
    ckpt_before = snapshot(existing_run)["ckpt.pt"]
    result = run_script(*train_args(data_root, existing_run, "--init_from=resume", "--eval_only=True"), check=True)
    assert "val loss" in result.stdout
    with open(os.path.join(existing_run, "metrics.jsonl")) as f:
        last = json.loads(f.read().strip().splitlines()[-1])
    assert last["iter"] == 2 and "val_loss" in last
    assert snapshot(existing_run)["ckpt.pt"] == ckpt_before


def test_sample_decodes_with_the_checkpoints_own_vocabulary_from_any_folder(existing_run, tmp_path):
    """The character list travels in ckpt.pt, so sampling works away from the data folder."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), f"--out_dir={existing_run}",
                             "--max_new_tokens=30", "--num_samples=1", "--stream=False", "--start=ROMEO:"],
                            cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout.split("---------------")[0]
    assert text.startswith("ROMEO:") and len(text.rstrip("\n")) >= len("ROMEO:") + 25
    assert torch.load(os.path.join(existing_run, "ckpt.pt"), weights_only=True)["chars"][:3] == ["\n", " ", "!"]
