"""
Draws one or more training runs from their metrics.jsonl into a PNG: training and validation loss against
step, tokens and training time, the learning rate, and HellaSwag accuracy when the runs measured it.

    python plot.py out-shakespeare-char-cpu                              # one run: writes runs.png
    python plot.py out-a out-b --labels=baseline,rope --png=rope.png     # several runs on the same axes

Each argument is a run's out_dir (or its metrics.jsonl). Tokens are counted from the logged throughput
(`tokens_per_sec` x `ms` per step), and training time is the sum of the logged step times: evaluations and
start-up are left out, so runs with different evaluation schedules compare step for step. A step logged
twice (a resume replays the steps after its checkpoint) counts once, with its latest record.
Needs matplotlib, an optional extra: `pip install matplotlib` (or `pip install ".[plot]"`).
"""

import os
import sys
import json
import statistics

from common import UserError, run_main
from configurator import read_settings

# -----------------------------------------------------------------------------
png = "runs.png"
labels = ""  # comma-separated, one per run; default: each run's folder name
title = ""
# -----------------------------------------------------------------------------


def metrics_file(path: str) -> str:
    """The metrics.jsonl that a run's out_dir, or the file itself, names."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: give a run's out_dir (train.py writes out_dir/metrics.jsonl) or the file itself")
    return path


def read_metrics(path: str) -> list[dict]:
    """The records of one metrics.jsonl, a step's latest record replacing earlier ones. A record cut short
    (a '{' without its '}') is what a crash mid-write leaves, as the last line or, once a resume has started
    the next record on a line of its own, before it: skipped, and said on stderr, so the run that most needs
    a look can still be drawn. Any other line that is not JSON is damage."""
    path = metrics_file(path)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")  # the last item is what follows the last newline: b"" when the file ends whole
    records = {}
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if raw.startswith(b"{") and not raw.rstrip().endswith(b"}"):
                print(f"{path}, line {number}: skipped a record cut short ({len(raw)} bytes, as a crash mid-write "
                      f"leaves it); drawing the rest", file=sys.stderr)
                continue
            raise UserError(f"{path}, line {number}: not JSON; is this a metrics.jsonl written by train.py?") from None
        if not isinstance(record, dict) or "iter" not in record:
            continue
        kind = "step" if "loss" in record else "eval" if "val_loss" in record else "hellaswag" if "hellaswag_acc" in record else None
        if kind is not None:
            records[(kind, record["iter"])] = {**records.get((kind, record["iter"]), {}), **record}
    return [records[key] for key in sorted(records, key=lambda k: k[1])]


def curves(records: list[dict]) -> dict:
    """Per run: step records with their token count and training time, evaluations, HellaSwag scores."""
    steps = [r for r in records if "loss" in r and r.get("loss") is not None]
    timed = [r for r in steps if r.get("ms") and r.get("tokens_per_sec")]
    tokens_per_step = statistics.median(r["tokens_per_sec"] * r["ms"] / 1000 for r in timed) if timed else None
    elapsed, previous_iter, seconds = {}, 0, 0.0
    for r in steps:  # each logged step time stands for the steps since the previous logged one
        if r.get("ms"):
            seconds += (r["iter"] - previous_iter) * r["ms"] / 1000
            previous_iter = r["iter"]
        elapsed[r["iter"]] = seconds
    evals = [r for r in records if r.get("val_loss") is not None]

    def time_at(step):  # an evaluation's time: the training time of the last step logged at or before it
        return max((t for i, t in elapsed.items() if i <= step), default=0.0)

    return dict(
        steps=steps, evals=evals,
        hellaswag=[r for r in records if r.get("hellaswag_acc") is not None],
        tokens=(lambda step: step * tokens_per_step) if tokens_per_step else None,
        seconds=[elapsed[r["iter"]] for r in steps], eval_seconds=[time_at(r["iter"]) for r in evals],
    )


def draw(runs: list[tuple[str, dict]], png_path: str, title_text: str = "") -> None:
    try:
        import matplotlib
    except ImportError:
        raise UserError('plot.py needs matplotlib, an optional extra: pip install matplotlib (or pip install ".[plot]")') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_hellaswag = any(c["hellaswag"] for _, c in runs)
    panels = ["step", "tokens", "seconds", "lr"] + (["hellaswag"] if with_hellaswag else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    for index, (label, c) in enumerate(runs):
        color = f"C{index}"
        steps = [r["iter"] for r in c["steps"]]
        train = [r["loss"] for r in c["steps"]]
        eval_steps = [r["iter"] for r in c["evals"]]
        val = [r["val_loss"] for r in c["evals"]]
        xs = {"step": (steps, eval_steps), "seconds": (c["seconds"], c["eval_seconds"])}
        if c["tokens"]:
            xs["tokens"] = ([c["tokens"](s) for s in steps], [c["tokens"](s) for s in eval_steps])
        for panel, (x_train, x_val) in xs.items():
            ax = axes[panel]
            ax.plot(x_train, train, color=color, alpha=0.55, linewidth=1, label=f"{label}, train")
            ax.plot(x_val, val, color=color, marker="o", linewidth=2, label=f"{label}, val")
        lrs = [(r["iter"], r["lr"]) for r in c["steps"] if r.get("lr") is not None]
        if lrs:
            axes["lr"].plot(*zip(*lrs), color=color, label=label)
        if c["hellaswag"]:
            h_steps = [r["iter"] for r in c["hellaswag"]]
            axes["hellaswag"].plot(h_steps, [r["hellaswag_acc_norm"] for r in c["hellaswag"]], color=color, marker="o",
                                   label=f"{label}, acc_norm")
            axes["hellaswag"].plot(h_steps, [r["hellaswag_acc"] for r in c["hellaswag"]], color=color, linestyle="--",
                                   label=f"{label}, acc")
    names = {"step": ("step", "loss"), "tokens": ("training tokens", "loss"), "seconds": ("training time, s (sum of step times)", "loss"),
             "lr": ("step", "learning rate"), "hellaswag": ("step", "HellaSwag accuracy")}
    for panel, ax in axes.items():
        ax.set_xlabel(names[panel][0])
        ax.set_ylabel(names[panel][1])
        ax.grid(alpha=0.3)
    axes["step"].legend(fontsize=8)
    if with_hellaswag:
        axes["hellaswag"].legend(fontsize=8)
    if title_text:
        fig.suptitle(title_text, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def main():
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    settings = read_settings(globals(), [a for a in sys.argv[1:] if a.startswith("--")])
    if not paths:
        raise UserError("no run given: python plot.py OUT_DIR [OUT_DIR ...] [--png=runs.png] [--labels=a,b]")
    names = settings.labels.split(",") if settings.labels else [os.path.basename(os.path.normpath(p)) for p in paths]
    if len(names) != len(paths):
        raise UserError(f"--labels has {len(names)} names for {len(paths)} runs: give one per run")
    runs = []
    for name, path in zip(names, paths):
        c = curves(read_metrics(path))
        if not c["steps"] and not c["evals"]:
            raise UserError(f"{metrics_file(path)} holds no logged step or evaluation yet: plot it once the run has logged one")
        runs.append((name, c))
    draw(runs, settings.png, settings.title)
    print(f"wrote {settings.png}")


if __name__ == "__main__":
    run_main(main)
