"""
A run's whole life loses nothing, each case against an uninterrupted run of the same settings (dropout on, so
the masks must follow (seed, step, micro-batch); CPU, gloo, fp32: bitwise): a stop request at any moment
(during evaluation, during HellaSwag, between checkpoints) ends with its own exit status and a checkpoint that
resumes exactly; a planned resume, init_from=auto and SIGKILLs at random moments continue the run; a relaunch
of a fine-tune continues it instead of starting over; under torchrun a SIGKILLed worker is restarted, a signal
to the agent or to every process stops the job cleanly, and a worker blocked in a collective still leaves;
and nodes (two torchrun launches) that restart apart, or hold the checkpoint on one node only, meet again.
"""

import os
import re
import sys
import time
import random
import signal
import subprocess

import pytest
import torch

from helpers import (CHILD_TIMEOUT, REPO, STOPPED_EXIT, TINY_TRAIN_ARGS, assert_same_weights, file_bytes, free_port,
                     load_saved, losses, read_metrics, run_script, script_env, start_run, stop_after, tiny_run_args,
                     watchdog, weights)
from helpers import EXAMPLES, write_jsonl

# the uninterrupted single-process run the stops, resumes and kills below are compared with
UNINTERRUPTED_ARGS = ["--max_iters=24", "--eval_interval=4", "--dropout=0.1"]
# dropout on, so the masks must follow (seed, step, micro-batch) for the runs to agree
TORCHRUN_ARGS = [*TINY_TRAIN_ARGS[1:], "--dropout=0.1", "--gradient_accumulation_steps=2", "--batch_size=2",
                 "--max_iters=16", "--lr_decay_iters=16", "--eval_interval=4",
                 "--bias=False"]  # bias=False: see test_distributed.py (key-bias roundoff differs across world sizes)


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    """An uninterrupted 24-step run with dropout (so the RNG state matters), a checkpoint every 4 steps."""
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    run_script(*tiny_run_args(data_root, out, *UNINTERRUPTED_ARGS), check=True)
    return out


# ---- a stop request at any moment, and its exit status ---------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_during_evaluation_is_honoured_between_batches(data_root, tmp_path, sig):
    out = str(tmp_path / "run")
    # an evaluation of 20,000 batches per split: far longer than the test waits for it
    proc = start_run(tiny_run_args(data_root, out, "--eval_iters=20000"))
    stdout, stderr = stop_after(proc, "single process on", sig, delay=0.5)
    assert proc.returncode == STOPPED_EXIT, stderr
    assert "val loss" not in stdout  # stopped inside the evaluation, not after it
    assert signal.Signals(sig).name in stderr and f"exit status {STOPPED_EXIT}" in stdout
    checkpoint = load_saved(out, "ckpt.pt")
    assert (checkpoint["iter_num"], checkpoint["evaluated"]) == (0, False)  # a resume evaluates step 0 first
    assert not os.path.exists(os.path.join(out, "best.pt"))


# train.py with a stop request arriving while each checkpoint is being written (a signal at that moment)
STOP_WHILE_SAVING = """
import os, sys
sys.path.insert(0, os.getcwd())
import train, common, stopping
real_save_run = train.save_run
def save_run(*args, **kwargs):
    stopping.StopRequest.requested = True
    return real_save_run(*args, **kwargs)
train.save_run = save_run
sys.argv = ["train.py", *sys.argv[1:]]
common.run_main(train.main)
"""


def test_stop_while_a_checkpoint_is_written_is_honoured_right_after_it(data_root, tmp_path):
    """The checkpoint just written is the one to resume from: no further step, no second write."""
    script = tmp_path / "stop_while_saving.py"
    script.write_text(STOP_WHILE_SAVING)
    out = str(tmp_path / "run")
    result = run_script(str(script), *tiny_run_args(data_root, out)[1:], timeout=300)
    assert result.returncode == STOPPED_EXIT, result.stderr
    checkpoint = load_saved(out, "ckpt.pt")
    assert (checkpoint["iter_num"], checkpoint["evaluated"]) == (0, True)
    lines = result.stdout.splitlines()
    assert len([line for line in lines if line.startswith("saved ")]) == 1 and not any(line.startswith("iter ") for line in lines)
    assert "stopped at step 0 on request" in result.stdout


def test_stop_during_hellaswag_is_honoured_between_chunks(data_root, tmp_path):
    examples = write_jsonl(tmp_path / "hellaswag.jsonl", EXAMPLES * 2000)  # far more than the test waits for
    out = str(tmp_path / "run")
    proc = start_run(tiny_run_args(data_root, out, "--dataset=shakespeare", "--hellaswag_interval=4",
                                f"--hellaswag_path={examples}"))
    stdout, stderr = stop_after(proc, "saved ", signal.SIGTERM, delay=0.5)  # step 0's evaluation and checkpoint done
    assert proc.returncode == STOPPED_EXIT, stderr
    assert "step 0: hellaswag" not in stdout  # stopped inside HellaSwag, not after it
    assert load_saved(out, "ckpt.pt")["iter_num"] == 0



def test_stopped_run_resumes_like_an_uninterrupted_one(data_root, uninterrupted, tmp_path):
    """SIGUSR1 once step 9 is logged: the run stops at the next step boundary, between two checkpoints, with
    exit status 75 and the signal named; the same init_from=auto command again ends as the uninterrupted run,
    best.pt included."""
    out = str(tmp_path / "run")
    args = tiny_run_args(data_root, out, *UNINTERRUPTED_ARGS, "--init_from=auto")
    proc = start_run(args)
    with watchdog(proc):
        stdout, stderr = stop_after(proc, "iter 9:", signal.SIGUSR1)
    assert proc.returncode == STOPPED_EXIT, stderr  # stopped on request: resume me
    assert "SIGUSR1" in stderr and "--init_from=resume" in stdout
    stopped_at = load_saved(out)["iter_num"]
    assert 10 <= stopped_at < 24
    run_script(*args, check=True)  # the same command again
    assert losses(out) == losses(uninterrupted)
    for name in ("ckpt.pt", "best.pt"):
        a, b = load_saved(out, name), load_saved(uninterrupted, name)
        assert a["iter_num"] == b["iter_num"]
        assert_same_weights(a["model"], b["model"])


# ---- a planned resume, init_from=auto, and kills at random moments ---------------------------------

def test_resume_is_bitwise_exact(data_root, uninterrupted, tmp_path):
    out = str(tmp_path)
    run_script(*tiny_run_args(data_root, out, *UNINTERRUPTED_ARGS, "--max_iters=12"), check=True)
    first_part = os.path.getsize(os.path.join(out, "metrics.jsonl"))
    run_script(*tiny_run_args(data_root, out, *UNINTERRUPTED_ARGS, "--init_from=resume"), check=True)
    assert losses(out) == losses(uninterrupted)
    assert_same_weights(weights(out), weights(uninterrupted))
    # metrics.jsonl was appended to, not truncated: the first run's lines are still its first lines
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert len(f.read()) > first_part
    checkpoint = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    for key in ("model", "optimizer", "scaler", "iter_num", "best_val_loss", "config", "model_args"):
        assert key in checkpoint
    assert checkpoint["iter_num"] == 24



def test_auto_starts_from_scratch_on_an_empty_out_dir_and_resumes_from_a_full_one(data_root, tmp_path):
    out = str(tmp_path / "run")
    first = run_script(*TINY_TRAIN_ARGS, f"--data_root={data_root}", f"--out_dir={out}", "--init_from=auto",
                       "--max_iters=5", check=True)
    assert "init_from=scratch" in first.stdout
    assert [r["init_from"] for r in read_metrics(out) if r.get("event") == "start"] == ["scratch"]
    second = run_script(*TINY_TRAIN_ARGS, f"--data_root={data_root}", f"--out_dir={out}", "--init_from=auto",
                        "--max_iters=10", check=True)
    assert "init_from=resume at step 5" in second.stdout
    starts = [r for r in read_metrics(out) if r.get("event") == "start"]
    assert [(r["init_from"], r["iter"]) for r in starts] == [("scratch", 0), ("resume", 5)]
    reference = str(tmp_path / "reference")
    run_script(*TINY_TRAIN_ARGS, f"--data_root={data_root}", f"--out_dir={reference}", "--max_iters=10",
               check=True)
    assert losses(out) == losses(reference)



@pytest.mark.slow  # several restarts of a training process (~30 s)
def test_sigkill_at_random_moments_then_resume(data_root, uninterrupted, tmp_path):
    out = str(tmp_path)
    args = tiny_run_args(data_root, out, *UNINTERRUPTED_ARGS)
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
            proc.wait(timeout=CHILD_TIMEOUT)
        if os.path.exists(os.path.join(out, "ckpt.pt")):  # never a torn file, whenever the kill came
            assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] % 4 == 0
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, "the run never finished"
    assert kills >= 3
    assert losses(out) == losses(uninterrupted)
    assert_same_weights(weights(out), weights(uninterrupted))



# ---- relaunches of a fine-tune ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gpt2_folder(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(folder)
    return str(folder)


def finetune_args(data_root, out, *extra):
    return tiny_run_args(data_root, out, "--dataset=shakespeare", "--block_size=32", "--dropout=0.1", "--eval_interval=3", *extra)


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
    assert f"init_from={tiny_gpt2_folder}" in first.stdout  # either way, the first launch starts from the folder
    env = script_env(SLURM_RESTART_COUNT="1") if launch == "requeue" else None
    again = run_script(*finetune_args(data_root, out, *source, "--max_iters=6"), env=env, check=True)
    assert "init_from=resume at step 3" in again.stdout
    # a requeue says that it resumes instead of starting over from the folder; init_from=auto resumes as it always does
    restarted = f"restart 1 of a run that began from {tiny_gpt2_folder}: resuming from {out}"
    assert (restarted in again.stderr) == (launch == "requeue"), again.stderr
    assert losses(out) == losses(reference)
    a, b = load_saved(out, "ckpt.pt")["model"], load_saved(reference, "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # two torchrun launches (~60 s)
def test_a_torchrun_restart_of_a_finetune_continues_it_exactly(data_root, tiny_gpt2_folder, tmp_path):
    """--init_from=<folder> under --max-restarts=1, a worker SIGKILLed after the checkpoint of step 3: the restart
    resumes from it instead of reloading the pretrained weights, and ends bitwise equal to an uninterrupted run."""
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
    a, b = load_saved(out, "ckpt.pt")["model"], load_saved(reference, "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)



# ---- torchrun: a worker SIGKILLed, a signal to the agent or to every process, a worker blocked ------

def torchrun_cmd(*args, nproc=2, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
            "train.py", *TORCHRUN_ARGS, *args]


def assert_same_run(out, reference):
    assert losses(out) == losses(reference)
    assert_same_weights(weights(out), weights(reference))
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 16


def wait_for_step(proc_log, step, proc, timeout=CHILD_TIMEOUT):
    """Block until the run has logged `step` (progress, not wall time, decides when a test strikes)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(proc_log):
            with open(proc_log) as f:
                if any(line.startswith(f"iter {step}:") for line in f):
                    return
        assert proc.poll() is None, open(proc_log).read()
        time.sleep(0.05)
    raise AssertionError(f"step {step} never came")


def worker_pids(agent_pid):
    """The training processes torchrun started (its children running train.py)."""
    out = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True, timeout=30).stdout.split()
    return [int(p) for p in out]


def worker_with_rank(agent_pid, rank):
    for pid in worker_pids(agent_pid):
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return pid
    raise AssertionError(f"no worker with RANK={rank}")


def start(cmd, log_path):
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc, log_path):
    try:
        proc.wait(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("torchrun hung:\n" + open(log_path).read()) from None
    return open(log_path).read()



@pytest.fixture(scope="module")
def uninterrupted_torchrun(data_root, tmp_path_factory):
    """The reference: 2 processes under torchrun, never stopped."""
    out = str(tmp_path_factory.mktemp("uninterrupted_torchrun"))
    result = subprocess.run(torchrun_cmd(f"--data_root={data_root}", f"--out_dir={out}"), cwd=REPO, env=script_env(),
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.mark.slow  # two torchrun attempts (~30 s)
def test_sigkilled_worker_is_restarted_by_torchrun_and_ends_bitwise_equal(data_root, uninterrupted_torchrun, tmp_path):
    out, log = str(tmp_path / "run"), str(tmp_path / "log")
    proc = start(torchrun_cmd(f"--data_root={data_root}", f"--out_dir={out}", "--init_from=auto",
                              extra=["--max-restarts=1"]), log)
    wait_for_step(log, 9, proc)  # past the checkpoint of step 8
    os.kill(worker_with_rank(proc.pid, 1), signal.SIGKILL)
    text = finish(proc, log)
    assert proc.returncode == 0, text
    assert "init_from=resume at step" in text  # the second attempt resumed instead of starting over
    assert_same_run(out, uninterrupted_torchrun)


@pytest.mark.slow  # a torchrun run stopped, then resumed (~30 s)
@pytest.mark.parametrize("target, sig", [("agent", signal.SIGTERM),  # kill <torchrun pid>, SLURM's signal to the launcher
                                         ("process group", signal.SIGTERM),  # scancel: every process of the step
                                         ("process group", signal.SIGINT)])  # Ctrl-C in a terminal
def test_signal_to_torchrun_leaves_a_checkpoint_that_resumes_exactly(data_root, uninterrupted_torchrun, tmp_path, target, sig):
    out, log = str(tmp_path / "run"), str(tmp_path / "log")
    proc = start(torchrun_cmd(f"--data_root={data_root}", f"--out_dir={out}", "--init_from=auto"), log)
    wait_for_step(log, 6, proc)
    if target == "agent":
        os.kill(proc.pid, sig)
    else:  # scancel / Ctrl-C: the agent and every worker at once; each worker also gets the agent's copy
        os.killpg(proc.pid, sig)
    text = finish(proc, log)
    assert "stopped at step" in text and "checkpoint saved" in text, text
    assert "exiting now without a checkpoint" not in text
    stopped_at = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"]
    assert 6 < stopped_at < 16
    resumed = subprocess.run(torchrun_cmd(f"--data_root={data_root}", f"--out_dir={out}", "--init_from=auto"),
                             cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"init_from=resume at step {stopped_at}" in resumed.stdout
    assert_same_run(out, uninterrupted_torchrun)



@pytest.mark.slow  # waits out torchrun's grace period for the stopped worker (~40 s)
def test_a_worker_blocked_in_a_collective_leaves_on_sigterm_before_the_grace_period_ends(data_root, tmp_path):
    """Rank 1 frozen (SIGSTOP), so rank 0 waits in an all-reduce that never completes; SIGTERM to torchrun must
    still end rank 0 within seconds (its handler cannot run there), while rank 1 waits for torchrun's SIGKILL."""
    log = str(tmp_path / "log")
    proc = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *TORCHRUN_ARGS,
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



# ---- nodes: two torchrun launches on this machine as the two nodes of one job ----------------------

def two_nodes(out_dirs, data_root, *args):
    """Two torchrun launches on this machine as nodes 0 and 1 of one job, each with its own out_dir (no shared filesystem)."""
    port = free_port()
    procs = []
    for node, out in enumerate(out_dirs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test",
               "train.py", *TORCHRUN_ARGS, f"--data_root={data_root}", f"--out_dir={out}", "--fsdp=True", *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=CHILD_TIMEOUT)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            raise AssertionError("a node hung") from None
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text
    return outputs


@pytest.fixture(scope="module")
def one_process_run(data_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one_process_run"))
    run_script(*single_args(data_root, out), check=True)
    return out


def single_args(data_root, out, *extra):
    return ["train.py", *TORCHRUN_ARGS, f"--data_root={data_root}", f"--out_dir={out}", *extra]


@pytest.mark.slow  # two torchrun launches rendezvous over c10d (~30 s)
def test_two_nodes_under_fsdp_train_like_one_process(data_root, one_process_run, tmp_path):
    node0, node1 = str(tmp_path / "node0"), str(tmp_path / "node1")
    outputs = two_nodes([node0, node1], data_root)
    assert "FSDP on 2" in outputs[0]
    assert "checkpoints: one file gathered on rank 0" in outputs[0]  # the nodes share no filesystem: no shards
    assert not os.path.exists(os.path.join(node1, "ckpt.pt"))  # only rank 0 writes
    la, lb = losses(node0), losses(one_process_run)
    assert la.keys() == lb.keys()
    for step in la:  # gradients are summed in another order across processes: equal up to roundoff
        assert abs(la[step] - lb[step]) <= 1e-5, (step, la[step], lb[step])
    a, b = weights(node0), weights(one_process_run)
    assert a.keys() == b.keys()  # every tensor of both, not node 0's alone
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-5, name


@pytest.mark.slow  # two two-node launches (~60 s)
def test_resume_when_only_rank_0s_node_has_the_checkpoint(data_root, one_process_run, tmp_path):
    node0, node1 = str(tmp_path / "node0"), str(tmp_path / "node1")
    two_nodes([node0, node1], data_root, "--max_iters=8")
    assert os.path.exists(os.path.join(node0, "ckpt.pt")) and not os.path.exists(os.path.join(node1, "ckpt.pt"))
    outputs = two_nodes([node0, node1], data_root, "--init_from=resume")
    assert "init_from=resume at step 8" in outputs[0]
    la, lb = losses(node0), losses(one_process_run)
    assert la.keys() == lb.keys()
    for step in la:
        assert abs(la[step] - lb[step]) <= 1e-5, (step, la[step], lb[step])
    a, b = weights(node0), weights(one_process_run)
    assert a.keys() == b.keys()  # every tensor of both, not node 0's alone
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-5, name



def launch_nodes(out_dirs, data_root, log_dir, torchrun_args=(), train_args=()):
    """Two torchrun launches on this machine as the two nodes of one job (c10d rendezvous on 127.0.0.1), each with
    its own out_dir; their output goes to log_dir/node<i>.log."""
    port, procs = free_port(), []
    for node, out in enumerate(out_dirs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test", *torchrun_args,
               "train.py", *TORCHRUN_ARGS, f"--data_root={data_root}", f"--out_dir={out}", "--init_from=auto", *train_args]
        log = open(os.path.join(log_dir, f"node{node}.log"), "w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
        time.sleep(0.5)  # node 0's agent joins first, so it is rank 0 in every round (c10d orders by agent)
    return procs


def wait_for_nodes(procs, log_dir):
    deadline = time.time() + CHILD_TIMEOUT
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
    final = max(out, key=lambda d: load_saved(d, "ckpt.pt")["iter_num"] if os.path.exists(os.path.join(d, "ckpt.pt")) else -1)
    run_losses = {}
    for folder in out:
        if os.path.exists(os.path.join(folder, "metrics.jsonl")):
            run_losses.update(losses(folder))
    assert run_losses == losses(reference[0])
    a, b = load_saved(final, "ckpt.pt"), load_saved(reference[0], "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == 16
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


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
    a, b = load_saved(out[0], "ckpt.pt"), load_saved(reference[0], "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == 16
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

