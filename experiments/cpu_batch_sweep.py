"""
How config/train_shakespeare_char_cpu.py got its batch size and number of steps: on a CPU the best
val loss a fixed wall time buys depends on how the time is spent (more steps, or more rows a step).

1. Step time by batch size: this repository's train_step with the quick start's model and precision,
   batch 12/16/20/24, and the recipe's step beside them, in one process, alternating every 10 steps (the machine's speed drifts by +-15%
   over minutes, so only side-by-side figures compare): median ms a step and a sequence.
2. Quality: the quick start with --batch_size, --max_iters (= lr_decay_iters = eval_interval) and
   --learning_rate overridden, 3 seeds each, best val loss. These runs are deterministic, so they
   run two at a time on one thread each (OMP_NUM_THREADS=1); their wall time is not the figure.
   The time each would take is estimated from part 1 (steps x step time).

    python experiments/cpu_batch_sweep.py [--parts=time,quality] [--seeds=1337,1338,1339] [out_root]

~25 minutes on 2 cores.
"""

import os
import re
import sys
import time
import statistics
import subprocess
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
CONFIG = "config/train_shakespeare_char_cpu.py"
BATCHES = (12, 16, 20, 24)
# (batch, steps, learning rate): 900 x 12 was the quick start before batch 16; then equal-time and shorter variants
RUNS = [(12, 900, 4e-3), (12, 750, 4e-3), (12, 700, 5e-3), (16, 750, 4e-3), (16, 700, 4e-3), (16, 650, 4e-3),
        (20, 600, 4e-3), (24, 500, 4e-3), (24, 500, 5e-3)]


def quick_start_settings():
    """The config file's settings, read the way train.py's configurator reads them."""
    settings = {"__file__": os.path.join(REPO, CONFIG)}
    exec(open(os.path.join(REPO, CONFIG)).read(), settings)
    return settings


def step_times(repeats=20):
    sys.argv = [sys.argv[0]]  # train.py reads no arguments at import, but keep them out of its way
    import train
    from model import GPT, GPTConfig
    c = quick_start_settings()
    dtype = c["dtype"] if c["dtype"] != "auto" else "float32"
    stream = train.BatchStream(os.path.join(REPO, "data", c["dataset"]), c["block_size"], 1337, 65)

    def setup(batch_size, rope=c["rope"], window=c["window"], lr=c["learning_rate"], beta1=c["beta1"], dtype=dtype):
        torch.manual_seed(1337)
        model = GPT(GPTConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["block_size"],
                              vocab_size=65, dropout=0.0, rope=rope, window=window))
        optimizer = model.configure_optimizers(0.1, lr, (beta1, c["beta2"]), "cpu")
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        settings = SimpleNamespace(gradient_accumulation_steps=1, batch_size=batch_size, seed=1337, grad_clip=1.0,
                                   out_dir=REPO, fsdp=False)
        state = train.TrainState(settings, model, model, model, optimizer, scaler, train.Processes(),
                                 train.autocast_context("cpu", dtype), "cpu")
        return lambda step: train.train_step(state, stream, step)

    steps = {b: setup(b) for b in BATCHES}
    # nanoGPT's CPU recipe as experiments/time_to_quality.py runs it: float32, learned positions, batch 12
    steps["recipe"] = setup(12, rope=False, window=None, lr=1e-3, beta1=0.9, dtype="float32")
    times = {b: [] for b in steps}
    for r in range(repeats):
        for b, step in steps.items():
            for i in range(10):
                t0 = time.perf_counter()
                step(r * 10 + i)
                times[b].append(time.perf_counter() - t0)
    print(f"step time by batch size ({dtype}, {torch.get_num_threads()} threads, {repeats * 10} steps each, alternating):\n")
    print("| batch | ms / step | ms / sequence |\n|---:|---:|---:|")
    ms = {b: statistics.median(t[10:]) * 1000 for b, t in times.items()}  # the first 10 warm up
    for b in BATCHES:
        print(f"| {b} | {ms[b]:.1f} | {ms[b] / b:.2f} |")
    print(f"| nanoGPT's CPU recipe (12, float32, learned positions) | {ms['recipe']:.1f} | {ms['recipe'] / 12:.2f} |")
    print(flush=True)
    return ms


def best_val_loss(batch, steps, lr, seed, out_root):
    out_dir = os.path.join(out_root, f"b{batch}-s{steps}-lr{lr:g}-{seed}")
    command = [sys.executable, "train.py", CONFIG, f"--batch_size={batch}", f"--max_iters={steps}", f"--lr_decay_iters={steps}",
               f"--eval_interval={steps}", f"--learning_rate={lr}", f"--seed={seed}", f"--out_dir={out_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    return min(float(v) for v in re.findall(r"val loss ([\d.]+)", log))


def quality(seeds, out_root, ms):
    jobs = [(b, s, lr, seed) for b, s, lr in RUNS for seed in seeds]
    with ThreadPoolExecutor(2) as pool:
        losses = list(pool.map(lambda job: best_val_loss(*job, out_root), jobs))
    print("| batch | steps | learning rate | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | est. training time |")
    print("|---:|---:|---:|" + "---:|" * (len(seeds) + 2))
    for i, (b, s, lr) in enumerate(RUNS):
        mine = losses[i * len(seeds):(i + 1) * len(seeds)]
        est = f"{s * ms[b] / 1000:.1f} s" if ms and b in ms else "-"
        print(f"| {b} | {s} | {lr:g} | " + " | ".join(f"{v:.3f}" for v in mine) + f" | {statistics.mean(mine):.3f} | {est} |")


def main(argv):
    parts, seeds, out_root = "time,quality", [1337, 1338, 1339], "out-cpu-batch-sweep"
    for arg in argv:
        if arg.startswith("--parts="):
            parts = arg.split("=", 1)[1]
        elif arg.startswith("--seeds="):
            seeds = [int(s) for s in arg.split("=", 1)[1].split(",")]
        else:
            out_root = arg
    out_root = os.path.abspath(out_root)
    if not os.path.exists(os.path.join(REPO, "data", "shakespeare_char", "train.bin")):
        subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, torch {torch.__version__}\n", flush=True)
    ms = step_times() if "time" in parts else {}
    if "quality" in parts:
        quality(seeds, out_root, ms)


if __name__ == "__main__":
    main(sys.argv[1:])
