"""
The speedrun choices against the baseline on shakespeare_char: Muon, QK-norm, ReLU² and all three, at equal
steps and at equal time, 3 seeds, then the table.

    python experiments/speedrun_variants.py [out_root] [--steps=300] [--seeds=1337,1338,1339] [--data_root=data]
    python experiments/speedrun_variants.py [out_root] --table     # the table of the runs finished so far

The recipe is experiments/variants.sh's (nanoGPT's CPU run: 4 layers, 4 heads, 128 wide, block 64, batch 12,
AdamW lr 1e-3, fp32, one thread), every setting a flag, shortened to --steps (the schedule with it) and 40
evaluation batches so that the whole measurement fits in ~25 CPU-minutes: what these choices buy is speed
early in training. Seed by seed: equal steps (every variant trains --steps steps, one after the other, so a
change of load hits all), then equal time (each variant trains as many steps as fit in the baseline's
time, its schedule shortened or lengthened to match). Time is the CPU time of the whole single-threaded run
(start-up and the two evaluations included, the same for every variant), from the first seed's equal-step
runs: on a shared machine wall time follows the load of the moment, CPU time much less. Appends every run to
out_root/results.jsonl, skips runs already there (so an interrupted measurement continues), and prints the
table of the seeds done.
"""

import os
import sys
import json
import time
import resource
import statistics
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECIPE = ["--init_from=scratch", "--dataset=shakespeare_char", "--device=cpu", "--dtype=float32", "--compile=False",
          "--attn_impl=auto", "--gradient_accumulation_steps=1", "--batch_size=12", "--block_size=64", "--n_layer=4",
          "--n_head=4", "--n_embd=128", "--dropout=0.0", "--bias=True", "--rope=False", "--n_kv_head=None",
          "--window=None", "--learning_rate=1e-3", "--weight_decay=0.1", "--beta1=0.9", "--beta2=0.99",
          "--grad_clip=1.0", "--decay_lr=True", "--min_lr=1e-4", "--eval_iters=40",
          "--log_interval=1", "--muon_lr=0.02", "--muon_momentum=0.95",
          "--muon_ns_steps=5", "--muon_weight_decay=0.0"]
OFF = ["--optimizer=adamw", "--qk_norm=False", "--mlp_act=gelu"]
VARIANTS = {
    "baseline (GPT-2, AdamW)": OFF,
    "Muon": [*OFF, "--optimizer=muon"],
    "QK-norm": [*OFF, "--qk_norm=True"],
    "ReLU²": [*OFF, "--mlp_act=relu2"],
    "all three": ["--optimizer=muon", "--qk_norm=True", "--mlp_act=relu2"],
}


def done_runs(out_root):
    path = os.path.join(out_root, "results.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def cpu_seconds_of_children():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(out_root, data_root, variant, seed, steps, kind):
    for record in done_runs(out_root):
        if (record["kind"], record["variant"], record["seed"], record["steps"]) == (kind, variant, seed, steps):
            return record
    out_dir = os.path.join(out_root, f"{kind}-{list(VARIANTS).index(variant)}-{seed}")
    if os.path.exists(out_dir):
        subprocess.run(["rm", "-rf", out_dir], check=True)
    command = [sys.executable, "train.py", *RECIPE, *VARIANTS[variant], f"--warmup_iters={min(100, steps)}", f"--max_iters={steps}",
               f"--lr_decay_iters={steps}", f"--eval_interval={steps}", f"--seed={seed}", f"--out_dir={out_dir}",
               f"--data_root={data_root}"]
    start, cpu_start = time.perf_counter(), cpu_seconds_of_children()
    subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, check=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))  # one thread: another count changes the last digits
    wall, cpu = time.perf_counter() - start, cpu_seconds_of_children() - cpu_start
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    record = dict(kind=kind, variant=variant, seed=seed, steps=steps, wall_s=wall, cpu_s=cpu,
                  val_loss=[r["val_loss"] for r in records if "val_loss" in r][-1],
                  median_ms=statistics.median(r["ms"] for r in records if "ms" in r and r["iter"] > 0),
                  load=os.getloadavg()[0], command=" ".join(command[1:]))
    with open(os.path.join(out_root, "results.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"{kind:11s} {variant:24s} seed {seed}: {steps:5d} steps, val loss {record['val_loss']:.4f}, "
          f"{record['median_ms']:.1f} ms/step, CPU {cpu:.1f} s, wall {wall:.1f} s, load {record['load']:.2f}", flush=True)
    return record


def print_table(out_root):
    records = done_runs(out_root)
    baseline = next(iter(VARIANTS))
    by = {(r["kind"], r["variant"], r["seed"]): r for r in records}  # a rerun replaces an earlier one
    for (kind, variant, seed), r in list(by.items()):
        if kind == "equal-steps" and variant == baseline:
            by[("equal-time", variant, seed)] = r  # the baseline's own time is its equal-steps run
    seeds = sorted({seed for kind, _, seed in by if all((k, v, seed) in by for k in ("equal-steps", "equal-time")
                                                       for v in VARIANTS)})
    if not seeds:
        print("no seed has all its runs yet")
        return
    steps = by[("equal-steps", baseline, seeds[0])]["steps"]

    def column(kind, variant):
        losses = [by[(kind, variant, seed)]["val_loss"] for seed in seeds]
        return " | ".join(f"{x:.4f}" for x in losses), statistics.mean(losses)

    print(f"\nval loss after {steps} steps (equal steps) and after the baseline's training time (equal time: the steps "
          f"each variant fits in it), seeds {', '.join(map(str, seeds))}\n")
    print("| variant | CPU s per run | equal steps: " + " | ".join(f"seed {s}" for s in seeds) + " | mean | vs baseline "
          "| equal time: steps | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | vs baseline |")
    print("|---|---:|" + "---:|" * (len(seeds) + 2) + "---:|" + "---:|" * (len(seeds) + 2))
    base = {kind: column(kind, baseline)[1] for kind in ("equal-steps", "equal-time")}
    for variant in VARIANTS:
        cpu = statistics.median(by[("equal-steps", variant, seed)]["cpu_s"] for seed in seeds)
        text_steps, mean_steps = column("equal-steps", variant)
        text_time, mean_time = column("equal-time", variant)
        print(f"| {variant} | {cpu:.1f} | {text_steps} | {mean_steps:.4f} | {mean_steps - base['equal-steps']:+.4f} | "
              f"{by[('equal-time', variant, seeds[0])]['steps']} | {text_time} | {mean_time:.4f} | "
              f"{mean_time - base['equal-time']:+.4f} |")


def main(argv):
    out_root, steps, seeds, data_root, table_only = "out-speedrun-variants", 300, [1337, 1338, 1339], "data", False
    for arg in argv:
        if arg.startswith("--steps="):
            steps = int(arg.split("=", 1)[1])
        elif arg.startswith("--seeds="):
            seeds = [int(s) for s in arg.split("=", 1)[1].split(",")]
        elif arg.startswith("--data_root="):
            data_root = arg.split("=", 1)[1]
        elif arg == "--table":
            table_only = True
        else:
            out_root = arg
    out_root, data_root = os.path.abspath(out_root), os.path.abspath(data_root)
    if table_only:
        print_table(out_root)
        return
    if not os.path.exists(os.path.join(data_root, "shakespeare_char", "train.bin")):
        subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    os.makedirs(out_root, exist_ok=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    baseline, budget = next(iter(VARIANTS)), None
    for seed in seeds:
        cpu = {variant: run(out_root, data_root, variant, seed, steps, "equal-steps")["cpu_s"] for variant in VARIANTS}
        if budget is None:  # fixed by the first seed, so every seed's equal-time runs are the same runs
            budget = {variant: round(steps * cpu[baseline] / cpu[variant]) for variant in VARIANTS}
        for variant in list(VARIANTS)[1:]:
            if budget[variant] == steps:  # the equal-steps run is that run
                with open(os.path.join(out_root, "results.jsonl"), "a") as f:
                    f.write(json.dumps(dict(run(out_root, data_root, variant, seed, steps, "equal-steps"),
                                            kind="equal-time")) + "\n")
            else:
                run(out_root, data_root, variant, seed, budget[variant], "equal-time")
        print_table(out_root)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
