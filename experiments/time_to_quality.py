"""
Time to quality on a CPU: nanoGPT's documented CPU recipe, run through this repository's train.py,
against the quick start, `python train.py config/train_shakespeare_char_cpu.py`. Each is timed as a
whole command (start-up, evaluations and checkpoints included), one after the other on the same
machine, for each seed; the order alternates from seed to seed so that a change of load hits both.
Prints and appends to out_root/results.jsonl the best val loss and wall time of every run, then the
medians and the ratio of wall times (quick start / recipe).

    python experiments/time_to_quality.py [out_root] [--seeds=1337,1338,1339] [--data_root=data] [--nanogpt_dir=../nanoGPT]

With --nanogpt_dir (a clone you make: `git clone https://github.com/karpathy/nanoGPT ../nanoGPT`), nanoGPT's own
train.py runs the recipe too, as a third run per seed; its console lines become out_root/nanoGPT-<seed>/metrics.jsonl
in this repository's format (`iter`, `loss`, `ms`, `tokens_per_sec`; `train_loss`, `val_loss`), so plot.py
draws it beside the others:

    python plot.py out-ttq/nanoGPT-1337 out-ttq/quick-start-1337 --png=quick_start_vs_nanogpt.png

Takes ~6 minutes on 2 idle cores; to run it in the background with a log:

    nohup python experiments/time_to_quality.py out-ttq > ttq.log 2>&1 &
"""

import os
import re
import sys
import json
import time
import tempfile
import statistics
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step_vs_nanogpt import check_nanogpt_dir, nanogpt_workdir  # noqa: E402

# nanoGPT's README, "I only have a macbook": its CPU command, flag for flag, on the GPU config it starts from
# (config/train_shakespeare_char.py here holds the same values as nanoGPT's)
RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
          "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
          "--lr_decay_iters=2000", "--dropout=0.0"]
QUICK_START = ["config/train_shakespeare_char_cpu.py"]
RECIPE_TOKENS_PER_STEP = 12 * 64


def load():
    return os.getloadavg()[0]


def nanogpt_metrics(log_text, tokens_per_step):
    """nanoGPT's console lines ("iter N: loss L, time Tms", "step N: train loss A, val loss B") as metrics.jsonl records."""
    records = []
    for line in log_text.splitlines():
        if m := re.match(r"iter (\d+): loss ([\d.]+), time ([\d.]+)ms", line):
            ms = float(m[3])
            records.append(dict(iter=int(m[1]), loss=float(m[2]), ms=ms, tokens_per_sec=tokens_per_step / ms * 1000))
        elif m := re.match(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", line):
            records.append(dict(iter=int(m[1]), train_loss=float(m[2]), val_loss=float(m[3])))
    return records


def run(name, args, seed, out_root, data_root, nanogpt=None):
    """One timed command: this repository's train.py, or with nanogpt=(clone, working folder) nanoGPT's."""
    out_dir = os.path.join(out_root, f"{name}-{seed}")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)  # metrics.jsonl is appended to: start clean
    os.makedirs(out_dir, exist_ok=True)
    if nanogpt is None:
        command, cwd = [sys.executable, "train.py", *args, f"--seed={seed}", f"--out_dir={out_dir}", f"--data_root={data_root}"], REPO
    else:  # nanoGPT's train.py has no --seed: it seeds with 1337 + rank, so its runs differ only by the machine's load
        clone, cwd = nanogpt
        command = [sys.executable, os.path.join(clone, "train.py"), *args, f"--out_dir={out_dir}", "--always_save_checkpoint=False"]
    load_before = load()
    log_path = os.path.join(out_dir, "log.txt")
    with open(log_path, "w") as log:
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, check=True)
        wall = time.perf_counter() - start
    if nanogpt is not None:
        with open(log_path) as f, open(metrics_path, "w") as out:
            out.writelines(json.dumps(r) + "\n" for r in nanogpt_metrics(f.read(), RECIPE_TOKENS_PER_STEP))
    with open(metrics_path) as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    record = dict(run=name, seed=seed, wall_s=wall, best_val_loss=best["val_loss"], best_at_iter=best["iter"],
                  evaluations=len(evals), load_before=load_before, load_after=load(), command=" ".join(command[1:]))
    print(f"{name:12s} seed {seed}: best val loss {best['val_loss']:.4f} (step {best['iter']}), wall {wall:6.1f} s, "
          f"load {load_before:.2f} -> {record['load_after']:.2f}", flush=True)
    return record


def main(argv):
    out_root, seeds, data_root, nanogpt_dir = "out-time-to-quality", [1337, 1338, 1339], os.path.join(REPO, "data"), None
    for arg in argv:
        if arg.startswith("--seeds="):
            seeds = [int(s) for s in arg.split("=", 1)[1].split(",")]
        elif arg.startswith("--data_root="):
            data_root = os.path.abspath(arg.split("=", 1)[1])
        elif arg.startswith("--nanogpt_dir="):
            nanogpt_dir = check_nanogpt_dir(arg.split("=", 1)[1])
        else:
            out_root = arg
    out_root = os.path.abspath(out_root)
    if not os.path.exists(os.path.join(data_root, "shakespeare_char", "train.bin")):
        subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    os.makedirs(out_root, exist_ok=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {load():.2f}", flush=True)
    runs = [("recipe", RECIPE), ("quick-start", QUICK_START)] + ([("nanoGPT", RECIPE)] if nanogpt_dir else [])
    records = []
    with tempfile.TemporaryDirectory() as nanogpt_work:
        if nanogpt_dir:
            nanogpt_workdir(nanogpt_work, data_root, nanogpt_dir)
        for i, seed in enumerate(seeds):
            for name, args in runs if i % 2 == 0 else runs[::-1]:
                records.append(run(name, args, seed, out_root, data_root, (nanogpt_dir, nanogpt_work) if name == "nanoGPT" else None))
                with open(os.path.join(out_root, "results.jsonl"), "a") as f:
                    f.write(json.dumps(records[-1]) + "\n")

    print("\n| run | command | " + " | ".join(f"seed {s}" for s in seeds) + " | median best val loss | median wall time |")
    print("|---|---|" + "---:|" * (len(seeds) + 2))
    medians = {}
    for name, args in runs:
        mine = [r for r in records if r["run"] == name]
        medians[name] = statistics.median(r["wall_s"] for r in mine)
        cells = " | ".join(f"{r['best_val_loss']:.3f}, {r['wall_s']:.1f} s" for r in mine)
        script = "nanoGPT's train.py" if name == "nanoGPT" else "train.py"
        print(f"| {name} | `python {script} {' '.join(args)}` | {cells} | "
              f"{statistics.median(r['best_val_loss'] for r in mine):.3f} | {medians[name]:.1f} s |")
    print(f"\nquick start / recipe, median wall time: {medians['quick-start'] / medians['recipe']:.2f}; "
          f"load average at the end {load():.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
