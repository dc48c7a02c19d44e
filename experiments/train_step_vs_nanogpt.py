"""
The training step against nanoGPT's, on a CPU, with nanoGPT's documented CPU recipe (4 layers, 4 heads,
128 wide, block 64, batch 12, fp32, no compile).

1. Whole commands: nanoGPT's own train.py (from a clone you make, --nanogpt_dir) and this repository's
   train.py, both with the recipe's flags, alternating, `repeats` times each: wall time of the command
   and the median time of a training step (steps 10.., evaluation steps left out).
2. Where a step's time goes: both models in one process, the same weights and the same loop (nanoGPT's
   get_batch, forward, backward, clip, AdamW, zero_grad, loss.item()), alternating every few steps:
   the median of each phase, then torch.profiler's operator table of our step. Variants of our step
   that change the optimizer or the precision are timed beside them.

    git clone https://github.com/karpathy/nanoGPT ../nanoGPT
    python experiments/train_step_vs_nanogpt.py --nanogpt_dir=../nanoGPT [--max_iters=2000] [--repeats=3]
        [--profile_steps=200] [--data_root=data]

nanoGPT's files are never copied into this repository: they are read from the clone. Run from anywhere; it
prepares data/shakespeare_char if needed. nanoGPT's GELU is the exact erf form,
ours GPT-2's tanh approximation (what its checkpoints need): the one difference in the model's math.
"""

import os
import re
import sys
import json
import time
import pickle
import tempfile
import statistics
import subprocess
import importlib.util

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from model import GPT, GPTConfig  # noqa: E402

RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
          "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
          "--lr_decay_iters=2000", "--dropout=0.0"]


NANOGPT_FILES = ("train.py", "model.py", "configurator.py", os.path.join("config", "train_shakespeare_char.py"))


def check_nanogpt_dir(path):
    """The absolute path of a clone of karpathy/nanoGPT, or exit with one line saying how to make one."""
    path = os.path.abspath(os.path.expanduser(path or ""))
    if not all(os.path.isfile(os.path.join(path, name)) for name in NANOGPT_FILES):
        sys.exit(f"error: --nanogpt_dir={path} is not a clone of karpathy/nanoGPT (it needs {', '.join(NANOGPT_FILES)}): "
                 "make one with `git clone https://github.com/karpathy/nanoGPT` and pass its path")
    return path



def nanogpt_workdir(root, data_root, nanogpt_dir):
    """The folder nanoGPT's train.py expects as its working directory (its files linked from the clone, never copied)."""
    data = os.path.join(root, "data", "shakespeare_char")
    os.makedirs(data, exist_ok=True)
    os.makedirs(os.path.join(root, "config"), exist_ok=True)
    for name in ("configurator.py", os.path.join("config", "train_shakespeare_char.py")):
        os.symlink(os.path.join(nanogpt_dir, name), os.path.join(root, name))
    for split in ("train.bin", "val.bin"):
        os.symlink(os.path.join(data_root, "shakespeare_char", split), os.path.join(data, split))
    with open(os.path.join(data_root, "shakespeare_char", "meta.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    with open(os.path.join(data, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": vocab_size}, f)  # nanoGPT's format; written here, read by nanoGPT


def time_command(command, cwd, log_path):
    with open(log_path, "w") as log:
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, check=True)
        return time.perf_counter() - start


def median_step_ms_nanogpt(log_path, eval_interval=250):
    steps = [(int(m[1]), float(m[2])) for m in re.finditer(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", open(log_path).read())]
    return statistics.median(ms for i, ms in steps if i >= 10 and i % eval_interval != 0)


def median_step_ms_ours(out_dir, eval_interval=250):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        steps = [(r["iter"], r["ms"]) for r in map(json.loads, f) if "ms" in r]
    return statistics.median(ms for i, ms in steps if i >= 10 and i % eval_interval != 0)


def whole_commands(root, data_root, max_iters, repeats, nanogpt_dir):
    recipe = [a for a in RECIPE if not a.startswith("--max_iters")] + [f"--max_iters={max_iters}"]  # a shorter run for timing
    work = os.path.join(root, "nanogpt-work")
    nanogpt_workdir(work, data_root, nanogpt_dir)
    rows = {"nanoGPT": [], "ours": []}
    for r in range(repeats):
        for name in ("nanoGPT", "ours") if r % 2 == 0 else ("ours", "nanoGPT"):
            out_dir = os.path.join(root, f"{name}-{r}")
            log = out_dir + ".log"
            if name == "nanoGPT":
                wall = time_command([sys.executable, os.path.join(nanogpt_dir, "train.py"), *recipe, f"--out_dir={out_dir}"], work, log)
                step = median_step_ms_nanogpt(log)
            else:
                wall = time_command([sys.executable, "train.py", *recipe, f"--out_dir={out_dir}", f"--data_root={data_root}"], REPO, log)
                step = median_step_ms_ours(out_dir)
            rows[name].append((wall, step))
            print(f"{name:8s} run {r}: wall {wall:6.1f} s, median step {step:6.2f} ms, load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"\n| code | whole command (median of {repeats}) | median step |\n|---|---:|---:|")
    med = {n: (statistics.median(w for w, _ in v), statistics.median(s for _, s in v)) for n, v in rows.items()}
    for name, (wall, step) in med.items():
        print(f"| {name} | {wall:.1f} s | {step:.2f} ms |")
    print(f"ours / nanoGPT: wall {med['ours'][0] / med['nanoGPT'][0]:.2f}, step {med['ours'][1] / med['nanoGPT'][1]:.2f}\n", flush=True)


def load_nanogpt_model_module(nanogpt_dir):
    spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(nanogpt_dir, "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_profile(data_root, profile_steps, nanogpt_dir):
    nano = load_nanogpt_model_module(nanogpt_dir)
    shape = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0, bias=True)
    torch.manual_seed(1337)
    theirs = nano.GPT(nano.GPTConfig(**shape))
    ours = GPT(GPTConfig(**shape))
    ours.load_state_dict(theirs.state_dict())  # the same names (GPT-2's); nanoGPT on torch 2 keeps no mask buffer
    data = np.memmap(os.path.join(data_root, "shakespeare_char", "train.bin"), dtype=np.uint16, mode="r")

    def get_batch():  # nanoGPT's, for both
        ix = torch.randint(len(data) - 64, (12,))
        x = torch.stack([torch.from_numpy((data[i:i + 64]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + 64]).astype(np.int64)) for i in ix])
        return x, y

    def make_step(model, optimizer, ctx):
        params = list(model.parameters())

        def step(times):
            t = [time.perf_counter()]
            x, y = get_batch()
            t.append(time.perf_counter())
            with ctx():
                _, loss = model(x, y)
            t.append(time.perf_counter())
            loss.backward()
            t.append(time.perf_counter())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            t.append(time.perf_counter())
            optimizer.step()
            t.append(time.perf_counter())
            optimizer.zero_grad(set_to_none=True)
            t.append(time.perf_counter())
            loss.item()
            t.append(time.perf_counter())
            times.append(np.diff(t) * 1000)
        return step

    def fp32():
        return torch.autocast("cpu", enabled=False)

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def our_copy():
        model = GPT(GPTConfig(**shape))
        model.load_state_dict(ours.state_dict())
        return model

    hp = dict(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.99), device_type="cpu")
    variants = {"nanoGPT": make_step(theirs, theirs.configure_optimizers(**hp), fp32),
                "ours": make_step(ours, ours.configure_optimizers(**hp), fp32)}
    fused = our_copy()
    variants["ours, fused AdamW"] = make_step(fused, fused.configure_optimizers(**hp, fused=True), fp32)
    bf = our_copy()
    variants["ours, fused AdamW, bf16 autocast"] = make_step(bf, bf.configure_optimizers(**hp, fused=True), bf16)
    times = {name: [] for name in variants}
    for step in variants.values():  # warm-up
        for _ in range(5):
            step([])
    for _ in range(profile_steps // 10):
        for name, step in variants.items():
            for _ in range(10):
                step(times[name])
    phases = ["data", "forward", "backward", "clip", "optimizer", "zero_grad", "loss.item"]
    print(f"median ms per phase over {profile_steps} steps each, {torch.get_num_threads()} threads, alternating every 10 steps:\n")
    print("| step | " + " | ".join(phases) + " | total | vs nanoGPT |\n|---|" + "---:|" * (len(phases) + 2))
    totals = {name: statistics.median(t.sum() for t in ts) for name, ts in times.items()}
    for name, ts in times.items():
        cells = " | ".join(f"{statistics.median(t[i] for t in ts):.2f}" for i in range(len(phases)))
        print(f"| {name} | {cells} | {totals[name]:.2f} | {totals[name] / totals['nanoGPT']:.2f} |")

    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            variants["ours"]([])
    print("\ntorch.profiler, our fp32 step (20 steps):\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main(argv):
    max_iters, repeats, profile_steps, data_root, parts, nanogpt_dir = 2000, 3, 200, os.path.join(REPO, "data"), "whole,profile", None
    for arg in argv:
        key, value = arg.removeprefix("--").split("=", 1)
        if key == "max_iters":
            max_iters = int(value)
        elif key == "repeats":
            repeats = int(value)
        elif key == "profile_steps":
            profile_steps = int(value)
        elif key == "data_root":
            data_root = os.path.abspath(value)
        elif key == "parts":
            parts = value
        elif key == "nanogpt_dir":
            nanogpt_dir = value
        else:
            sys.exit(f"unknown argument {arg}")
    nanogpt_dir = check_nanogpt_dir(nanogpt_dir)
    if not os.path.exists(os.path.join(data_root, "shakespeare_char", "train.bin")):
        subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}\n", flush=True)
    with tempfile.TemporaryDirectory() as root:
        if "whole" in parts:
            whole_commands(root, data_root, max_iters, repeats, nanogpt_dir)
    if "profile" in parts:
        step_profile(data_root, profile_steps, nanogpt_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
