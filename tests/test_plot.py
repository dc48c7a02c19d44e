"""
plot.py: the curves it draws from metrics.jsonl (tokens and training time worked out here by hand, a step
replayed after a resume counted once), the PNG it writes, and one line when matplotlib or a run is missing.
"""

import json
import sys

import pytest

import plot
from helpers import assert_user_error, run_script


def write_metrics(folder, records):
    folder.mkdir()
    with open(folder / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(folder)


# steps of 1,000 tokens: 100 ms each at first, then 200 ms; evaluations at 0 and 4; a resume replays step 4
RUN = [
    {"event": "start", "iter": 0, "init_from": "scratch", "world_size": 1},
    {"iter": 0, "train_loss": 4.0, "val_loss": 4.1, "lr": 0.0},
    {"iter": 0, "loss": 4.2, "lr": 0.0, "ms": 100.0, "tokens_per_sec": 10_000.0},
    {"iter": 2, "loss": 3.0, "lr": 1e-3, "ms": 100.0, "tokens_per_sec": 10_000.0},
    {"iter": 4, "loss": 2.9, "lr": 1e-3, "ms": 200.0, "tokens_per_sec": 5_000.0},
    {"event": "start", "iter": 4, "init_from": "resume", "world_size": 1},
    {"iter": 4, "loss": 2.5, "lr": 1e-3, "ms": 200.0, "tokens_per_sec": 5_000.0},
    {"iter": 4, "train_loss": 2.4, "val_loss": 2.6, "lr": 1e-3},
    {"iter": 4, "hellaswag_acc": 0.25, "hellaswag_acc_norm": 0.5, "hellaswag_n": 4},
]


def test_curves_by_hand(tmp_path):
    c = plot.curves(plot.read_metrics(write_metrics(tmp_path / "run", RUN)))
    assert [(r["iter"], r["loss"]) for r in c["steps"]] == [(0, 4.2), (2, 3.0), (4, 2.5)]  # step 4: its latest record
    assert [c["tokens"](s) for s in (0, 2, 4)] == [0, 2_000, 4_000]  # 1,000 tokens a step
    assert c["seconds"] == pytest.approx([0.0, 0.2, 0.6])  # 2 steps of 0.1 s, then 2 of 0.2 s
    assert [(r["iter"], r["val_loss"]) for r in c["evals"]] == [(0, 4.1), (4, 2.6)]
    assert c["eval_seconds"] == pytest.approx([0.0, 0.6])
    assert [(r["iter"], r["hellaswag_acc_norm"]) for r in c["hellaswag"]] == [(4, 0.5)]


def test_records_torn_by_a_crash_are_skipped_wherever_they_are(tmp_path, capsys):
    """A crash mid-write tears the record being written, the first of a run as well as any later one; once
    resumed, the next record starts on a line of its own (runlog.py). Each torn line is skipped and said."""
    folder = tmp_path / "run"
    folder.mkdir()
    whole = [json.dumps(r) for r in RUN[1:4]]
    (folder / "metrics.jsonl").write_text('{"iter": 0, "lo\n' + "\n".join(whole[:2]) + '\n{"iter": 2, "train\n' + whole[2] + "\n")
    assert plot.read_metrics(str(folder)) == [RUN[1], RUN[2], RUN[3]]
    err = capsys.readouterr().err
    assert "line 1: skipped a record cut short" in err and "line 4: skipped a record cut short" in err


def test_draws_a_png_of_several_runs(tmp_path):
    pytest.importorskip("matplotlib")
    a = write_metrics(tmp_path / "a", RUN)
    b = write_metrics(tmp_path / "b", [r for r in RUN if "hellaswag_acc" not in r])
    png = tmp_path / "out" / "runs.png"
    result = run_script("plot.py", a, b, "--labels=first,second", f"--png={png}", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {png}"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_without_matplotlib_is_one_line(tmp_path):
    run = write_metrics(tmp_path / "run", RUN)
    code = ("import sys, runpy; sys.modules['matplotlib'] = None; "  # None in sys.modules: the import fails
            f"sys.argv = ['plot.py', {run!r}, '--png={tmp_path / 'x.png'}']; runpy.run_path('plot.py', run_name='__main__')")
    result = run_script("-c", code, timeout=120)
    assert_user_error(result, "matplotlib", "pip install")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, fragment", [([], "no run given"), (["missing_dir"], "not found"),
                                            (["RUN", "--labels=a,b"], "--labels has 2 names for 1 runs")])
def test_mistakes_are_one_line(tmp_path, args, fragment):
    run = write_metrics(tmp_path / "run", RUN)
    args = [run if a == "RUN" else str(tmp_path / a) if a == "missing_dir" else a for a in args]
    result = run_script("plot.py", *args, f"--png={tmp_path / 'x.png'}", timeout=120)
    assert_user_error(result, fragment)
    assert not (tmp_path / "x.png").exists()


def test_a_file_that_is_not_metrics(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"iter": 0, "loss": 1.0}\nnot json\n')
    with pytest.raises(plot.UserError, match="line 2: not JSON"):
        plot.read_metrics(str(folder))
    assert sys.modules["plot"] is plot
