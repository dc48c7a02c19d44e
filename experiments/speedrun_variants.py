"""
The speedrun choices against the baseline on shakespeare_char: Muon, QK-norm, ReLU² and all three, at equal
steps and at equal time, 3 seeds, then the table.

    python experiments/speedrun_variants.py [out_root] [--steps=500] [--seeds=1337,1338,1339] [--data_root=data]

The recipe is experiments/variants.sh's (nanoGPT's CPU run: 4 layers, 4 heads, 128 wide, block 64, batch 12,
AdamW lr 1e-3, fp32, one thread), every setting a flag, shortened to --steps (the schedule with it) so that the
whole measurement fits in ~25 CPU-minutes: what these choices buy is speed early in training.
Equal steps: every variant trains --steps steps. Equal time: each variant then trains as many steps as fit in
the baseline's training time, from the median step times of the equal-step runs (which alternate variant by
variant, so a change of load hits all), its schedule shortened or lengthened to match.
Prints the table and appends every run to out_root/results.jsonl.
"""

import os
import sys
import json
import time
import statistics
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECIPE = ["--init_from=scratch", "--dataset=shakespeare_char", "--device=cpu", "--dtype=float32", "--compile=False",
          "--attn_impl=auto", "--gradient_accumulation_steps=1", "--batch_size=12", "--block_size=64", "--n_layer=4",
          "--n_head=4", "--n_embd=128", "--dropout=0.0", "--bias=True", "--rope=False", "--n_kv_head=None",
          "--window=None", "--learning_rate=1e-3", "--weight_decay=0.1", "--beta1=0.9", "--beta2=0.99",
          "--grad_clip=1.0", "--decay_lr=True", "--warmup_iters=100", "--min_lr=1e-4", "--eval_iters=100",
          "--log_interval=1", "--always_save_checkpoint=False", "--muon_lr=0.02", "--muon_momentum=0.95",
          "--muon_ns_steps=5", "--muon_weight_decay=0.0"]
OFF = ["--optimizer=adamw", "--qk_norm=False", "--mlp_act=gelu"]
VARIANTS = {
    "baseline (GPT-2, AdamW)": OFF,
    "Muon": [*OFF, "--optimizer=muon"],
    "QK-norm": [*OFF, "--qk_norm=True"],
    "ReLU²": [*OFF, "--mlp_act=relu2"],
    "all three": ["--optimizer=muon", "--qk_norm=True", "--mlp_act=relu2"],
}


def run(out_root, data_root, variant, seed, steps, kind):
    out_dir = os.path.join(out_root, f"{kind}-{list(VARIANTS).index(variant)}-{seed}")
    if os.path.exists(out_dir):
        subprocess.run(["rm", "-rf", out_dir], check=True)
    command = [sys.executable, "train.py", *RECIPE, *VARIANTS[variant], f"--max_iters={steps}",
               f"--lr_decay_iters={steps}", f"--eval_interval={steps}", f"--seed={seed}", f"--out_dir={out_dir}",
               f"--data_root={data_root}"]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, check=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))  # one thread: another count changes the last digits
    wall = time.perf_counter() - start
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    record = dict(kind=kind, variant=variant, seed=seed, steps=steps, wall_s=wall,
                  val_loss=[r["val_loss"] for r in records if "val_loss" in r][-1],
                  median_ms=statistics.median(r["ms"] for r in records if "ms" in r and r["iter"] > 0),
                  load=os.getloadavg()[0], command=" ".join(command[1:]))
    with open(os.path.join(out_root, "results.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"{kind:11s} {variant:24s} seed {seed}: {steps:5d} steps, val loss {record['val_loss']:.4f}, "
          f"{record['median_ms']:.1f} ms/step, wall {wall:.1f} s, load {record['load']:.2f}", flush=True)
    return record


def main(argv):
    out_root, steps, seeds, data_root = "out-speedrun-variants", 500, [1337, 1338, 1339], "data"
    for arg in argv:
        if arg.startswith("--steps="):
            steps = int(arg.split("=", 1)[1])
        elif arg.startswith("--seeds="):
            seeds = [int(s) for s in arg.split("=", 1)[1].split(",")]
        elif arg.startswith("--data_root="):
            data_root = arg.split("=", 1)[1]
        else:
            out_root = arg
    out_root, data_root = os.path.abspath(out_root), os.path.abspath(data_root)
    if not os.path.exists(os.path.join(data_root, "shakespeare_char", "train.bin")):
        subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    os.makedirs(out_root, exist_ok=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)

    equal_steps = {v: [] for v in VARIANTS}
    for seed in seeds:
        for variant in VARIANTS:
            equal_steps[variant].append(run(out_root, data_root, variant, seed, steps, "equal-steps"))
    ms = {v: statistics.median(r["median_ms"] for r in runs) for v, runs in equal_steps.items()}
    baseline = next(iter(VARIANTS))
    budget = {v: round(steps * ms[baseline] / ms[v]) for v in VARIANTS}
    equal_time = {baseline: equal_steps[baseline]}
    for seed in seeds:
        for variant in list(VARIANTS)[1:]:
            equal_time.setdefault(variant, []).append(run(out_root, data_root, variant, seed, budget[variant], "equal-time"))

    def cells(runs):
        losses = [r["val_loss"] for r in runs]
        return " | ".join(f"{x:.4f}" for x in losses), statistics.mean(losses)

    base_steps, base_time = cells(equal_steps[baseline])[1], cells(equal_time[baseline])[1]
    print(f"\nval loss after {steps} steps (equal steps), and after the baseline's training time (equal time: the "
          f"steps each variant fits in it, from the median step times)\n")
    print("| variant | ms / step | equal steps: " + " | ".join(f"seed {s}" for s in seeds) + " | mean | vs baseline "
          "| equal time: steps | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | vs baseline |")
    print("|---|---:|" + "---:|" * (len(seeds) + 2) + "---:|" + "---:|" * (len(seeds) + 2))
    for variant in VARIANTS:
        text_steps, mean_steps = cells(equal_steps[variant])
        text_time, mean_time = cells(equal_time[variant])
        print(f"| {variant} | {ms[variant]:.1f} | {text_steps} | {mean_steps:.4f} | {mean_steps - base_steps:+.4f} | "
              f"{budget[variant]} | {text_time} | {mean_time:.4f} | {mean_time - base_time:+.4f} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
