"""
A fingerprint of what train.py and sample.py produce, to show that a refactoring changed no behaviour: the
sha256 of every tensor of every checkpoint (one file or DCP shards, read with DCP's own converter, not this
repository's loader) and the metrics of every run, timings left out, of these runs at a small size:

    single   12 steps on one process (evaluations at 0, 4, 8, 12: ckpt.pt and best.pt)
    resume   the same run resumed to 16 steps
    ddp      2 processes (torchrun, gloo), DDP
    fsdp     2 processes, FSDP2: sharded checkpoints (ckpt.dcp/, best.dcp/)
    stopped  12 steps stopped by SIGTERM at step 5 (exit status 75: a checkpoint at step 6)
    stop     that run continued with --init_from=auto
    sample   sample.py from the single run

Run it on two checkouts with the same --work folder (the settings a checkpoint keeps name out_dir) and compare:

    python experiments/behaviour_fingerprint.py /work/base --work=/tmp/fp --data_root=/tmp/fpdata > before.json
    python experiments/behaviour_fingerprint.py . --work=/tmp/fp --data_root=/tmp/fpdata > after.json
    cmp before.json after.json

data_root must hold shakespeare_char prepared (python data/shakespeare_char/prepare.py).
"""

import os
import sys
import json
import shutil
import hashlib
import argparse
import tempfile
import subprocess

import torch

SMALL = ["config/train_shakespeare_char_cpu.py", "--max_iters=12", "--eval_interval=4", "--eval_iters=2", "--n_layer=2",
         "--n_embd=64", "--n_head=2", "--block_size=64", "--batch_size=4", "--device=cpu", "--log_interval=1"]
TIMINGS = ("ms", "tokens_per_sec", "mfu")  # differ from run to run


def tensor_hashes(value, prefix=""):
    """{key path: sha256 of dtype, shape and bytes} for every tensor in a nest of dicts and lists; other leaves as they are."""
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        digest = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode() + t.view(-1).view(torch.uint8).numpy().tobytes())
        return {prefix: digest.hexdigest()}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in tensor_hashes(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in tensor_hashes(item, f"{prefix}/{i}").items()}
    return {prefix: value}


def checkpoint_hashes(out_dir):
    """The fingerprint of every checkpoint in out_dir: *.pt files, and *.dcp folders converted to one file by DCP."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    found = {}
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if name.endswith(".pt"):
            found[name] = tensor_hashes(torch.load(path, map_location="cpu", weights_only=True))
        elif name.endswith(".dcp"):
            with open(os.path.join(path, "checkpoint.json")) as f:
                index = json.load(f)
            with tempfile.TemporaryDirectory() as tmp:
                dcp_to_torch_save(os.path.join(path, index.pop("shards")), os.path.join(tmp, "whole.pt"))
                tensors = torch.load(os.path.join(tmp, "whole.pt"), map_location="cpu", weights_only=True)
            found[name] = dict(tensor_hashes(tensors), index=index)
    return found


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in f]


def run(repo, args, torchrun=False, expect=0):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [sys.executable]
    proc = subprocess.run(launcher + args, cwd=repo, capture_output=True, text=True, env=ENV)
    if proc.returncode != expect:
        sys.exit(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


# train.py with a SIGTERM sent to itself as step STOP_AT starts: the run stops with a checkpoint at step STOP_AT + 1
STOP_AT = 5
STOPPING_TRAIN = f"""
import os, sys, signal
sys.path.insert(0, os.getcwd())
import train, common
real_step = train.train_step
def train_step(state, batches, step):
    if step == {STOP_AT}:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_step(state, batches, step)
train.train_step = train_step
sys.argv = ["train.py", *sys.argv[1:]]
common.run_main(train.main)
"""


def stopped(repo, work, args):
    """The run stopped by SIGTERM (exit status 75), as the stopping_train.py above stops it."""
    script = os.path.join(work, "stopping_train.py")
    with open(script, "w") as f:
        f.write(STOPPING_TRAIN)
    run(repo, [script, *args], expect=75)


ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("repo")
    parser.add_argument("--work", required=True)
    parser.add_argument("--data_root", required=True)
    opts = parser.parse_args()
    repo, work = os.path.abspath(opts.repo), os.path.abspath(opts.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    small = SMALL + [f"--data_root={os.path.abspath(opts.data_root)}"]
    out = {name: os.path.join(work, name) for name in ("single", "resume", "ddp", "fsdp", "stop")}
    result = {}
    run(repo, ["train.py", *small, f"--out_dir={out['single']}"])
    shutil.copytree(out["single"], out["resume"])
    run(repo, ["train.py", *small, f"--out_dir={out['resume']}", "--init_from=resume", "--max_iters=16"])
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp=True"])):
        run(repo, ["train.py", *small, f"--out_dir={out[name]}", "--gradient_accumulation_steps=2", *extra], torchrun=True)
    stopped(repo, work, [*small, f"--out_dir={out['stop']}"])
    result["stopped"] = dict(checkpoints=checkpoint_hashes(out["stop"]), metrics=metrics(out["stop"]))
    run(repo, ["train.py", *small, f"--out_dir={out['stop']}", "--init_from=auto"])
    for name, folder in out.items():
        result[name] = dict(checkpoints=checkpoint_hashes(folder), metrics=metrics(folder))
    sample = run(repo, ["sample.py", f"--out_dir={out['single']}", "--num_samples=2", "--max_new_tokens=64", "--device=cpu",
                        "--stream=False"])
    result["sample"] = sample
    json.dump(result, sys.stdout, indent=1, sort_keys=True, default=str)
    print()


if __name__ == "__main__":
    main()
