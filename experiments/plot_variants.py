"""
Plots val loss against step for the runs of experiments/variants.sh (mean over seeds, band = min..max)
and prints the table of best val losses. Needs matplotlib (pip install matplotlib).

    python experiments/plot_variants.py out-variants [experiments/variants_val_loss.png]
"""

import os
import sys
import json
from collections import defaultdict

import numpy as np


def load_runs(root):
    """{variant: {seed: (steps, val_losses)}} from root/<variant>-<seed>/metrics.jsonl of the finished runs."""
    runs = defaultdict(dict)
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "metrics.jsonl")
        if not os.path.exists(os.path.join(root, name, "done")):  # finished runs only
            continue
        variant, seed = name.rsplit("-", 1)
        with open(path) as f:
            evals = [r for r in map(json.loads, f) if "val_loss" in r]
        runs[variant][seed] = ([r["iter"] for r in evals], [r["val_loss"] for r in evals])
    return runs


def main(root, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = load_runs(root)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    print(f"{'variant':18s} {'seeds':>5s} {'best val (mean)':>16s} {'min':>7s} {'max':>7s}")
    for variant, seeds in runs.items():
        n = min(len(v[1]) for v in seeds.values())
        steps = list(seeds.values())[0][0][:n]
        losses = np.array([v[1][:n] for v in seeds.values()])
        best = losses.min(axis=1)
        print(f"{variant:18s} {len(seeds):5d} {best.mean():16.4f} {best.min():7.4f} {best.max():7.4f}")
        ax.plot(steps[1:], losses.mean(axis=0)[1:], label=variant)
        ax.fill_between(steps[1:], losses.min(axis=0)[1:], losses.max(axis=0)[1:], alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss (shakespeare_char)")
    ax.set_title("shakespeare_char, 4 layers x 128, block 64, lr 1e-3, 2000 steps\nmean over seeds; band: min..max", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out-variants",
         sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "variants_val_loss.png"))
