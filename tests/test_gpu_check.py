"""
experiments/gpu_check.py: its dry run goes through every check's code path on a CPU and writes both
reports, whose figures agree with what bench.py and train.py wrote themselves; the batch search, the time
limits (a killed process group, a SIGTERM at the budget) and a failing check that does not stop the
others are tested in-process with stand-ins.
"""

import os
import sys
import json
import time
import datetime

import pytest
import torch

from conftest import REPO, run_script, assert_user_error

sys.path.insert(0, os.path.join(REPO, "experiments"))
import gpu_check  # noqa: E402

CHECK_NAMES = ["cuda_tests", "bench", "attention", "decode", "shakespeare", "distributed"]


# -----------------------------------------------------------------------------
# the dry run, end to end

@pytest.fixture(scope="module")
def dry_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_dry_run")
    result = run_script("experiments/gpu_check.py", "--dry_run", f"--out={out}", f"--data_root={data_root}", timeout=1000)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(out / "report.json") as f:
        report = json.load(f)
    return result, out, report, {c["name"]: c for c in report["checks"]}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_dry_run_runs_every_check(dry_run):
    result, out, report, checks = dry_run
    assert [c["name"] for c in report["checks"]] == CHECK_NAMES
    assert "no check failed" in result.stdout
    assert checks["cuda_tests"]["status"] == "skipped" and "no CUDA" in checks["cuda_tests"]["reason"]
    assert checks["cuda_tests"]["figures"]["skipped"] >= 7 and checks["cuda_tests"]["figures"]["passed"] == 0
    for name in CHECK_NAMES[1:]:
        assert checks[name]["status"] == "pass", checks[name]
        assert checks[name]["commands"] and all(c["returncode"] == 0 for c in checks[name]["commands"] if not c["stopped_at_budget"])
    assert report["dry_run"] is True and report["device"]["name"].startswith("CPU")
    assert report["total_seconds"] <= report["budget_s"]


@pytest.mark.slow
def test_dry_run_figures_are_what_the_scripts_measured(dry_run):
    _, out, _, checks = dry_run
    bench = checks["bench"]
    assert [row["batch"] for row in bench["rows"]] == [2, 4] and all(row["fits"] for row in bench["rows"])
    measured = read_jsonl(out / "bench" / "train_b4.jsonl")[-1]["result"]  # bench.py's own record
    assert bench["figures"]["batch_size"] == 4 and bench["figures"]["tokens_per_sec"] == measured["tokens_per_sec"]
    assert bench["figures"]["mfu"] is None  # no peak FLOPs for a CPU

    attention = checks["attention"]["rows"]
    assert [row["T"] for row in attention] == [64, 512]
    assert all(row["full_ms"] > 0 and row["window-blocked_ms"] > 0 for row in attention)
    assert all(row["auto_eager"] in ("dense", "blocked") and row["auto_compiled"] in ("dense", "blocked") for row in attention)

    decode = checks["decode"]["rows"]
    assert sorted({row["batch"] for row in decode}) == [1, 32] and len(decode) == 8
    assert all(row["tokens_per_sec"] > 0 for row in decode)
    assert checks["decode"]["figures"]["b32_cache_speedup"] > 0

    for row, folder in zip(checks["shakespeare"]["rows"], ("learned", "rope")):
        evals = [r["val_loss"] for r in read_jsonl(out / "shakespeare" / folder / "metrics.jsonl") if "val_loss" in r]
        assert row["stopped_at_budget"] and row["best_val_loss"] == min(evals) < evals[0]

    assert [row["mode"] for row in checks["distributed"]["rows"]] == ["DDP", "FSDP"]
    assert all(row["steps"] == 10 and row["last_loss"] < row["first_loss"] for row in checks["distributed"]["rows"])


@pytest.mark.slow
def test_dry_run_markdown_report(dry_run):
    _, out, report, _ = dry_run
    text = (out / "report.md").read_text()
    assert "python experiments/gpu_check.py --dry_run" in text and report["command"] in text
    assert datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d") in text and "CPU" in text
    assert "| cuda_tests | skipped |" in text
    for name in CHECK_NAMES[1:]:
        assert f"| {name} | pass |" in text and f"## {name}:" in text
    assert "window-flex skipped" in text  # CUDA-only paths say so


# -----------------------------------------------------------------------------
# the parts, in-process

def fits_below(limit, calls):
    def fits(batch):
        calls.append(batch)
        return dict(tokens_per_sec=float(batch)) if batch <= limit else None
    return fits


@pytest.mark.parametrize("start, limit, cap, expected, tried", [
    (16, 48, 1024, 48, [16, 32, 64, 48]),  # up by doubling, then halfway between 32 (fits) and 64 (OOM)
    (64, 20, 1024, 16, [64, 32, 16, 24]),  # down by halving, then halfway between 16 and 32
    (1, 100, 4, 4, [1, 2, 4]),  # the cap: nothing ran out of memory
    (8, 0, 1024, None, [8, 4, 2, 1]),  # nothing fits
])
def test_search_largest_batch(start, limit, cap, expected, tried):
    calls = []
    best, results = gpu_check.search_largest_batch(fits_below(limit, calls), start, cap, lambda: True)
    assert best == expected and calls == tried
    assert all((results[b] is not None) == (b <= limit) for b in tried)


def test_search_largest_batch_stops_when_time_runs_out():
    calls = []
    best, _ = gpu_check.search_largest_batch(fits_below(1000, calls), 16, 1024, lambda: len(calls) < 2)
    assert best == 32 and calls == [16, 32]


def context(tmp_path, seconds, name="t"):
    return gpu_check.CheckContext(name, str(tmp_path), time.monotonic() + seconds, True, str(tmp_path), {})


def test_time_limit_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    c = context(tmp_path, 3)
    start = time.monotonic()
    result = c.run([sys.executable, "-c", script], "sleeper")
    assert result.timed_out and time.monotonic() - start < 10
    assert c.commands[0]["timed_out"] and c.commands[0]["command"].startswith("python -c")
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed with its parent; reaped by init soon after
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the grandchild outlived the time limit")
    with pytest.raises(gpu_check.CheckFailed, match="out of time"):
        context(tmp_path, 2).run_ok([sys.executable, "-c", "import time; time.sleep(60)"], "again")


def test_stop_after_sends_sigterm_once_ready(tmp_path):
    ready_file = tmp_path / "ready"
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: (print('stopping'), sys.exit(0)))\n"
              "time.sleep(1.0)\n"
              f"open({str(ready_file)!r}, 'w').close()\n"
              "time.sleep(60)\n")
    result = context(tmp_path, 30).run([sys.executable, "-c", script], "stoppable", stop_after=0.1, ready=ready_file.exists)
    assert result.stopped and not result.timed_out and result.returncode == 0 and "stopping" in result.stdout
    assert result.seconds >= 1.0  # not before it was ready


def test_a_failing_check_does_not_stop_the_others(tmp_path):
    def fails(c):
        raise gpu_check.CheckFailed("bench.py --batch_size=8: exit 1 (boom)", dict(figures=dict(batch_size=None)))

    def has_a_bug(c):
        raise KeyError("tokens_per_sec")

    def passes(c):
        c.run([sys.executable, "-c", "print('hello')"], "hello")
        return dict(status="pass", figures=dict(answer=42), rows=[dict(a=1, b="x|y")])

    checks = [gpu_check.Check(name, name, 10, 10, fn) for name, fn in (("one", fails), ("two", has_a_bug), ("three", passes))]
    report = dict(command="python experiments/gpu_check.py --out=x", date="today", dry_run=True,
                  device=dict(name="CPU (2 cores)", torch=torch.__version__))
    gpu_check.run_checks(checks, str(tmp_path), True, str(tmp_path), report["device"], report)
    entries = json.loads((tmp_path / "report.json").read_text())["checks"]
    assert [(e["name"], e["status"]) for e in entries] == [("one", "fail"), ("two", "fail"), ("three", "pass")]
    assert entries[0]["error"] == "bench.py --batch_size=8: exit 1 (boom)" and entries[0]["figures"] == dict(batch_size=None)
    assert "KeyError" in entries[1]["error"] and "Traceback" in entries[1]["traceback"]
    assert entries[2]["commands"][0]["returncode"] == 0 and (tmp_path / "three" / "hello.out").read_text() == "hello\n"
    text = (tmp_path / "report.md").read_text()
    assert "| one | fail |" in text and "error: bench.py --batch_size=8: exit 1 (boom)" in text and "| three | pass |" in text
    assert "x\\|y" in text  # a cell's | does not break the table


def run_in_process(monkeypatch, capsys, *args):
    """gpu_check's main() as the command line runs it; returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["experiments/gpu_check.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.run_main(gpu_check.main)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line(code, stderr, *fragments):
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:"), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="here the command would run the GPU checks")
def test_no_gpu_without_dry_run_is_one_line(tmp_path, monkeypatch, capsys):
    assert_one_line(*run_in_process(monkeypatch, capsys, f"--out={tmp_path / 'report'}"), "no CUDA GPU", "--dry_run")
    assert not (tmp_path / "report").exists()


def test_unknown_check_is_one_line(tmp_path, monkeypatch, capsys):
    code, stderr = run_in_process(monkeypatch, capsys, "--dry_run", "--only=bench,speed", f"--out={tmp_path / 'report'}")
    assert_one_line(code, stderr, "--only", "'speed'", "cuda_tests")
    assert not (tmp_path / "report").exists()


def test_the_command_line_reports_a_user_error(tmp_path):
    result = run_script("experiments/gpu_check.py", "--dry_run", "--budget_scale=0", f"--out={tmp_path / 'report'}", timeout=120)
    assert_user_error(result, "--budget_scale=0.0")
    assert not (tmp_path / "report").exists()


def test_gpu_budgets_fit_eight_minutes():
    assert [c.name for c in gpu_check.CHECKS] == CHECK_NAMES
    assert sum(c.budget_s for c in gpu_check.CHECKS) <= gpu_check.TOTAL_BUDGET_S <= 8 * 60


def test_the_whole_run_stops_at_its_budget(tmp_path, monkeypatch):
    """Each check's deadline is its own budget or the run's, whichever comes first."""
    monkeypatch.setattr(gpu_check, "DRY_TOTAL_BUDGET_S", 3)

    def sleeps(c):
        c.run_ok([sys.executable, "-c", "import time; time.sleep(60)"], "sleep")
        return dict(status="pass")

    checks = [gpu_check.Check(name, name, 100, 100, sleeps) for name in ("first", "second")]
    report = dict(command="c", date="d", dry_run=True, device=dict(name="CPU", torch="t"))
    start = time.monotonic()
    gpu_check.run_checks(checks, str(tmp_path), True, str(tmp_path), report["device"], report)
    assert time.monotonic() - start < 10
    first, second = report["checks"]
    assert first["status"] == "fail" and "out of time" in first["error"] and first["commands"][0]["timed_out"]
    assert second["status"] == "fail" and "no time left" in second["error"] and not second["commands"]
