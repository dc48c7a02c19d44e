"""
A run's whole life loses nothing (issue 21): the best-validated weights survive every stop, a restart of any
start continues its run, a resume refuses another architecture and honours changed training settings, a stop
request is honoured during evaluation and ends with its own exit status, and a full disk is one line with the
previous checkpoint intact. Each case against an uninterrupted run, or the file it must not have touched.
"""

import os
import re
import sys
import time
import errno
import signal
import shutil
import subprocess

import pytest
import torch

from conftest import REPO, TINY_TRAIN_ARGS, assert_user_error, read_metrics, run_script, script_env

STOPPED_EXIT = 75


def train_args(data_root, out_dir, *extra):
    return [*TINY_TRAIN_ARGS, f"--data_root={data_root}", f"--out_dir={out_dir}", *extra]


def load(out_dir, name):
    return torch.load(os.path.join(out_dir, name), weights_only=True)


def losses(out_dir):
    return {r["iter"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def start_run(args, **env):
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=script_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop_after(proc, prefix, sig, delay=0.0):
    """Send `sig` once the run has printed a line starting with `prefix` (progress, not wall time, decides)."""
    for line in proc.stdout:
        if line.startswith(prefix):
            time.sleep(delay)
            proc.send_signal(sig)
            break
    stdout, stderr = proc.communicate(timeout=120)
    return stdout, stderr


# ---- 1. the best model survives every stop ---------------------------------------------------------

def test_best_pt_holds_the_best_validated_weights_and_a_stop_never_replaces_it(data_root, tmp_path):
    out = str(tmp_path / "run")
    # a learning rate high enough that the validation loss does not improve at every evaluation
    args = train_args(data_root, out, "--max_iters=40", "--eval_interval=4", "--learning_rate=3e-2", "--decay_lr=False")
    proc = start_run(args)
    stdout, stderr = stop_after(proc, "iter 17:", signal.SIGTERM)
    assert proc.returncode == STOPPED_EXIT, stderr
    vals = {r["iter"]: r["val_loss"] for r in read_metrics(out) if "val_loss" in r}
    best_step = min(vals, key=vals.get)
    best = load(out, "best.pt")
    assert (best["iter_num"], best["val_loss"]) == (best_step, vals[best_step])
    assert "optimizer" not in best  # the weights alone
    stopped = load(out, "ckpt.pt")
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
    best = load(out, "best.pt")
    assert best["val_loss"] == min(vals.values())
    if best["iter_num"] == best_step:
        assert file_bytes(os.path.join(out, "best.pt")) == before


# ---- 3. changed settings on resume -----------------------------------------------------------------

@pytest.fixture(scope="module")
def six_steps(data_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("six"))
    run_script(*train_args(data_root, out, "--max_iters=6", "--eval_interval=3"), check=True)
    return out


def snapshot(folder):
    return {name: file_bytes(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def test_resume_refuses_another_architecture_naming_each_field(data_root, six_steps, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(six_steps, out)
    before = snapshot(out)
    result = run_script(*train_args(data_root, out, "--init_from=auto", "--max_iters=8", "--n_layer=3", "--n_kv_head=1"))
    line = assert_user_error(result, "--n_layer=3", "2", "--n_kv_head=1")
    assert "n_embd" not in line  # only the fields that differ
    assert snapshot(out) == before


def test_resume_takes_unset_architecture_from_the_checkpoint(data_root, six_steps, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(six_steps, out)
    # no model settings at all: the defaults (12 layers, 768 wide, block 1024) are not the checkpoint's
    result = run_script("train.py", "--init_from=resume", f"--out_dir={out}", f"--data_root={data_root}",
                        "--dataset=shakespeare_char", "--device=cpu", "--dtype=float32", "--compile=False",
                        "--batch_size=4", "--gradient_accumulation_steps=1", "--max_iters=8", "--eval_interval=3",
                        "--eval_iters=2", check=True)
    assert "init_from=resume at step 6" in result.stdout
    assert load(out, "ckpt.pt")["model_args"] == load(six_steps, "ckpt.pt")["model_args"]
    assert load(out, "ckpt.pt")["config"]["n_layer"] == 2  # the run's settings describe the model it trains


def test_resume_honours_a_changed_dropout_and_says_what_changed(data_root, six_steps, tmp_path):
    runs = {}
    for dropout in (0.0, 0.2):
        out = str(tmp_path / f"p{int(dropout * 10)}")
        shutil.copytree(six_steps, out)
        result = run_script(*train_args(data_root, out, "--init_from=resume", "--max_iters=9", "--eval_interval=3",
                                        f"--dropout={dropout}"), check=True)
        runs[dropout] = (out, result.stdout)
    out, stdout = runs[0.2]
    assert "changed since the checkpoint's run: " in stdout and "dropout 0.0 -> 0.2" in stdout
    assert "max_iters 6 -> 9" in stdout
    assert load(out, "ckpt.pt")["model_args"]["dropout"] == 0.2
    changes = next(line for line in runs[0.0][1].splitlines() if line.startswith("changed since"))
    assert "max_iters 6 -> 9" in changes and "dropout" not in changes
    with_dropout, without = losses(out), losses(runs[0.0][0])
    assert [with_dropout[s] for s in range(6)] == [without[s] for s in range(6)]
    assert all(with_dropout[s] != without[s] for s in range(6, 9))  # the dropout was applied


# ---- 4. a stop request at any moment, and its exit status ------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_during_evaluation_is_honoured_between_batches(data_root, tmp_path, sig):
    out = str(tmp_path / "run")
    # an evaluation of 20,000 batches per split: far longer than the test waits for it
    proc = start_run(train_args(data_root, out, "--eval_iters=20000"))
    stdout, stderr = stop_after(proc, "single process on", sig, delay=0.5)
    assert proc.returncode == STOPPED_EXIT, stderr
    assert "val loss" not in stdout  # stopped inside the evaluation, not after it
    assert signal.Signals(sig).name in stderr and f"exit status {STOPPED_EXIT}" in stdout
    checkpoint = load(out, "ckpt.pt")
    assert (checkpoint["iter_num"], checkpoint["evaluated"]) == (0, False)  # a resume evaluates step 0 first
    assert not os.path.exists(os.path.join(out, "best.pt"))


def test_stop_during_hellaswag_is_honoured_between_chunks(data_root, tmp_path):
    from test_hellaswag import EXAMPLES, write_jsonl
    examples = write_jsonl(tmp_path / "hellaswag.jsonl", EXAMPLES * 2000)  # far more than the test waits for
    out = str(tmp_path / "run")
    proc = start_run(train_args(data_root, out, "--dataset=shakespeare", "--hellaswag_interval=4",
                                f"--hellaswag_path={examples}"))
    stdout, stderr = stop_after(proc, "saved ", signal.SIGTERM, delay=0.5)  # step 0's evaluation and checkpoint done
    assert proc.returncode == STOPPED_EXIT, stderr
    assert "step 0: hellaswag" not in stdout  # stopped inside HellaSwag, not after it
    assert load(out, "ckpt.pt")["iter_num"] == 0


def test_stopped_run_resumes_like_an_uninterrupted_one(data_root, tmp_path):
    args = ["--max_iters=12", "--eval_interval=4", "--dropout=0.1"]
    reference = str(tmp_path / "reference")
    run_script(*train_args(data_root, reference, *args), check=True)
    out = str(tmp_path / "run")
    proc = start_run(train_args(data_root, out, *args, "--init_from=auto"))
    stop_after(proc, "iter 5:", signal.SIGUSR1)
    assert proc.returncode == STOPPED_EXIT
    run_script(*train_args(data_root, out, *args, "--init_from=auto"), check=True)  # the same command again
    assert losses(out) == losses(reference)
    for name in ("ckpt.pt", "best.pt"):
        a, b = load(out, name), load(reference, name)
        assert a["iter_num"] == b["iter_num"]
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name


# ---- 2. restarts of any start ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gpt2_folder(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(folder)
    return str(folder)


def finetune_args(data_root, out, *extra):
    return train_args(data_root, out, "--dataset=shakespeare", "--block_size=32", "--dropout=0.1", "--eval_interval=3", *extra)


@pytest.mark.parametrize("launch", ["requeue", "auto"])
def test_a_relaunched_finetune_continues_its_run(data_root, tiny_gpt2_folder, tmp_path, launch):
    """A SLURM requeue of a run begun from a folder (SLURM_RESTART_COUNT > 0), or the same init_from=auto
    command launched again, resumes instead of reloading the pretrained weights at step 0."""
    reference = str(tmp_path / "reference")
    run_script(*finetune_args(data_root, reference, f"--init_from={tiny_gpt2_folder}", "--max_iters=6"), check=True)
    out = str(tmp_path / "run")
    source = ([f"--init_from={tiny_gpt2_folder}"] if launch == "requeue"
              else ["--init_from=auto", f"--auto_from={tiny_gpt2_folder}"])
    first = run_script(*finetune_args(data_root, out, *source, "--max_iters=3"), check=True)
    assert f"init_from={tiny_gpt2_folder if launch == 'requeue' else tiny_gpt2_folder}" in first.stdout
    env = script_env(SLURM_RESTART_COUNT="1") if launch == "requeue" else None
    again = run_script(*finetune_args(data_root, out, *source, "--max_iters=6"), env=env, check=True)
    assert "init_from=resume at step 3" in again.stdout
    assert losses(out) == losses(reference)
    a, b = load(out, "ckpt.pt")["model"], load(reference, "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # two torchrun launches (~60 s)
def test_a_torchrun_restart_of_a_finetune_continues_it_exactly(data_root, tiny_gpt2_folder, tmp_path):
    """--init_from=<folder> under --max-restarts=1, a worker SIGKILLed after the checkpoint of step 3: the restart
    resumes from it instead of reloading the pretrained weights, and ends bitwise equal to an uninterrupted run."""
    from test_fault_tolerance import finish, start, wait_for_step, worker_with_rank
    def command(out):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
                *finetune_args(data_root, out, f"--init_from={tiny_gpt2_folder}", "--max_iters=8",
                               "--gradient_accumulation_steps=2", "--batch_size=2")]
    reference, out = str(tmp_path / "reference"), str(tmp_path / "run")
    proc = start(command(reference), str(tmp_path / "reference.log"))
    assert finish(proc, str(tmp_path / "reference.log")) and proc.returncode == 0
    proc = start(command(out), str(tmp_path / "run.log"))
    wait_for_step(str(tmp_path / "run.log"), 4, proc)
    os.kill(worker_with_rank(proc.pid, 1), signal.SIGKILL)
    text = finish(proc, str(tmp_path / "run.log"))
    assert proc.returncode == 0, text
    assert "resuming from" in text and "init_from=resume at step 3" in text
    assert losses(out) == losses(reference)
    a, b = load(out, "ckpt.pt")["model"], load(reference, "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- 4. workers blocked in a collective leave promptly ---------------------------------------------

@pytest.mark.slow  # waits out torchrun's grace period for the stopped worker (~40 s)
def test_a_worker_blocked_in_a_collective_leaves_on_sigterm_before_the_grace_period_ends(data_root, tmp_path):
    """Rank 1 frozen (SIGSTOP), so rank 0 waits in an all-reduce that never completes; SIGTERM to torchrun must
    still end rank 0 within seconds (its handler cannot run there), while rank 1 waits for torchrun's SIGKILL."""
    from test_fault_tolerance import ARGS, finish, start, wait_for_step, worker_with_rank
    log = str(tmp_path / "log")
    proc = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *ARGS,
                  f"--data_root={data_root}", f"--out_dir={tmp_path / 'run'}", "--max_iters=100000", "--eval_interval=100000"],
                 log)
    wait_for_step(log, 3, proc)
    rank0, rank1 = worker_with_rank(proc.pid, 0), worker_with_rank(proc.pid, 1)
    os.kill(rank1, signal.SIGSTOP)
    time.sleep(2)  # rank 0 reaches the next all-reduce and waits there
    os.kill(proc.pid, signal.SIGTERM)
    while os.path.exists(f"/proc/{rank0}") and open(f"/proc/{rank0}/stat").read().split()[2] != "Z":
        assert proc.poll() is None, open(log).read()
        time.sleep(0.1)
    rank1_alive = os.path.exists(f"/proc/{rank1}")
    text = finish(proc, log)
    assert rank1_alive, text  # rank 0 left before torchrun's grace period ended in SIGKILL
    assert "blocked outside Python" in text


# ---- 5. a full disk --------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only; skipped elsewhere), unmounted afterwards."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True, text=True,
                             timeout=60)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield str(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], timeout=30)


def fill(folder, leave):
    """Fill the file system of `folder` until `leave` bytes are free."""
    free = shutil.disk_usage(folder).free - leave
    with open(os.path.join(folder, "filler"), "wb") as f:
        try:
            f.write(b"\0" * max(free, 0))
            f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_full_disk_mid_run_is_one_line_and_keeps_the_last_checkpoint(data_root, small_disk):
    out = os.path.join(small_disk, "run")
    proc = start_run(train_args(data_root, out, "--max_iters=20", "--eval_interval=4", "--n_embd=64"))
    for line in proc.stdout:
        if line.startswith("iter 5:"):  # the checkpoint of step 4 is written; the next comes at step 8
            fill(small_disk, leave=64 * 1024)  # room for metrics lines, not for a checkpoint
            break
    stdout, stderr = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    line = assert_user_error(result, "ckpt.pt", "No space left on device", "MiB")
    assert "needs about" in line
    assert sorted(os.listdir(out)) == ["best.pt", "ckpt.pt", "metrics.jsonl"]  # no temporary file left
    assert load(out, "ckpt.pt")["iter_num"] == 4
    read_metrics(out)  # every line still one JSON object


# ---- 6. nodes that restart apart -------------------------------------------------------------------

def launch_nodes(out_dirs, data_root, log_dir, torchrun_args=(), train_args=()):
    """Two torchrun launches on this machine as the two nodes of one job (c10d rendezvous on 127.0.0.1), each with
    its own out_dir; their output goes to log_dir/node<i>.log."""
    from test_fault_tolerance import ARGS, free_port
    port, procs = free_port(), []
    for node, out in enumerate(out_dirs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test", *torchrun_args,
               "train.py", *ARGS, f"--data_root={data_root}", f"--out_dir={out}", "--init_from=auto", *train_args]
        log = open(os.path.join(log_dir, f"node{node}.log"), "w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
        time.sleep(0.5)  # node 0's agent joins first, so it is rank 0 in every round (c10d orders by agent)
    return procs


def wait_for_nodes(procs, log_dir):
    from test_fault_tolerance import TIMEOUT
    deadline = time.time() + TIMEOUT
    for proc in procs:
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError("a node hung:\n" + "\n".join(open(os.path.join(log_dir, f"node{i}.log")).read()
                                                             for i in range(len(procs)))) from None
    return [open(os.path.join(log_dir, f"node{i}.log")).read() for i in range(len(procs))]


@pytest.mark.slow  # two two-node launches (~70 s)
def test_nodes_that_restart_apart_meet_again_and_finish_like_an_uninterrupted_run(data_root, tmp_path):
    """A worker SIGKILLed on node 1: node 1's agent counts a restart, node 0's restarts for a membership change
    without counting one; both attempts' processes must still meet (no hang) and resume exactly."""
    from test_fault_tolerance import losses_by_step, wait_for_step, worker_pids
    reference = [str(tmp_path / "reference0"), str(tmp_path / "reference1")]
    os.makedirs(tmp_path / "reference_logs")
    texts = wait_for_nodes(launch_nodes(reference, data_root, str(tmp_path / "reference_logs")), str(tmp_path / "reference_logs"))
    assert all("Traceback" not in t for t in texts)
    out, logs = [str(tmp_path / "node0"), str(tmp_path / "node1")], str(tmp_path / "logs")
    os.makedirs(logs)
    procs = launch_nodes(out, data_root, logs, torchrun_args=["--max-restarts=1"])
    wait_for_step(os.path.join(logs, "node0.log"), 9, procs[0])  # past the checkpoint of step 8
    for pid in worker_pids(procs[1].pid):
        os.kill(pid, signal.SIGKILL)
    texts = wait_for_nodes(procs, logs)
    assert [p.returncode for p in procs] == [0, 0], texts
    # the new round may make either node rank 0 (the one that logs and writes): its out_dir has the end of the run
    resumed_at = re.search(r"init_from=resume at step (\d+)", texts[0] + texts[1])
    assert resumed_at and int(resumed_at.group(1)) in (8, 12), texts  # the last checkpoint before the kill
    final = max(out, key=lambda d: load(d, "ckpt.pt")["iter_num"] if os.path.exists(os.path.join(d, "ckpt.pt")) else -1)
    run_losses = {}
    for folder in out:
        if os.path.exists(os.path.join(folder, "metrics.jsonl")):
            run_losses.update(losses_by_step(folder))
    assert run_losses == losses_by_step(reference[0])
    a, b = load(final, "ckpt.pt"), load(reference[0], "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == 16
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ---- 7. the checkpoint hand-over between nodes -----------------------------------------------------

@pytest.mark.slow  # four two-node launches (~2 min)
def test_the_newest_copy_wins_when_rank_0s_node_holds_an_older_one(data_root, tmp_path):
    """Node 0 (rank 0) holds the checkpoint of step 4, node 1 that of step 8: the run resumes at step 8 (node 1's
    file, streamed to node 0) and ends as the uninterrupted run does."""
    reference = [str(tmp_path / "reference0"), str(tmp_path / "reference1")]
    os.makedirs(tmp_path / "reference_logs")
    wait_for_nodes(launch_nodes(reference, data_root, str(tmp_path / "reference_logs")), str(tmp_path / "reference_logs"))
    out, logs = [str(tmp_path / "node0"), str(tmp_path / "node1")], str(tmp_path / "logs")
    os.makedirs(logs)
    wait_for_nodes(launch_nodes(out, data_root, logs, train_args=["--max_iters=4"]), logs)
    older = file_bytes(os.path.join(out[0], "ckpt.pt"))
    wait_for_nodes(launch_nodes(out, data_root, logs, train_args=["--max_iters=8"]), logs)
    os.replace(os.path.join(out[0], "ckpt.pt"), os.path.join(out[1], "ckpt.pt"))  # the newest copy on node 1 only
    with open(os.path.join(out[0], "ckpt.pt"), "wb") as f:
        f.write(older)
    texts = wait_for_nodes(launch_nodes(out, data_root, logs), logs)
    assert "init_from=resume at step 8" in texts[0], texts
    assert not [name for name in os.listdir(out[0]) if name.endswith(".tmp")]  # the received file is gone
    a, b = load(out[0], "ckpt.pt"), load(reference[0], "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == 16
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
