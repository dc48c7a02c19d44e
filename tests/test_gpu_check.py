"""
experiments/gpu_check.py: its dry run, on a fresh copy of the repository with no data folder, goes through
every check's code path on a CPU, builds its own character corpus, keeps checkpoints out of its report
folder and writes both reports, whose figures agree with what bench.py and train.py wrote themselves; the
batch search, the time limits (a killed process group, a SIGTERM at the budget), the rows of a killed
pytest, the data search and a failing check that does not stop the others are tested in-process with
stand-ins; and every repository module imports with torch's API narrowed to what torch 2.6 has.
"""

import os
import sys
import json
import shlex
import time
import datetime
import subprocess

import pytest
import torch

from helpers import REPO, run_script, assert_user_error, fresh_copy, script_env, shakespeare_input

sys.path.insert(0, os.path.join(REPO, "experiments"))
import gpu_check  # noqa: E402

CHECK_NAMES = ["cuda_tests", "bench", "attention", "decode", "shakespeare", "distributed"]
REPORT_SUFFIXES = (".md", ".json", ".jsonl", ".out", ".err", ".xml", ".log")


# -----------------------------------------------------------------------------
# the dry run, end to end, on a fresh copy: no data/shakespeare_char/input.txt, no ../shared

def documented_dry_run():
    """The dry-run command of docs/gpu_check.md, word for word: what the tests below run."""
    with open(os.path.join(REPO, "docs", "gpu_check.md"), encoding="utf-8") as f:
        commands = [line.strip() for line in f if line.startswith("python experiments/gpu_check.py") and "--dry_run" in line]
    assert len(commands) == 1, f"docs/gpu_check.md should show one dry-run command, not {commands}"
    return shlex.split(commands[0])


def test_the_dry_run_tested_is_the_documented_one():
    argv = documented_dry_run()
    assert argv[:3] == ["python", "experiments/gpu_check.py", "--dry_run"]
    assert [a for a in argv if a.startswith("--out=")], "the dry run's report folder is where its tests look"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    copy = fresh_copy(str(root / "repo"))
    scratch_parent = root / "tmp"
    scratch_parent.mkdir()
    argv = documented_dry_run()
    out = root / "repo" / next(a for a in argv if a.startswith("--out=")).split("=", 1)[1]
    result = subprocess.run([sys.executable, *argv[1:]], cwd=copy,
                            capture_output=True, text=True, env=script_env(TMPDIR=str(scratch_parent)), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(out / "report.json") as f:
        report = json.load(f)
    return result, out, report, {c["name"]: c for c in report["checks"]}, scratch_parent


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_dry_run_runs_every_check_on_a_fresh_copy(dry_run):
    result, out, report, checks, scratch_parent = dry_run
    assert [c["name"] for c in report["checks"]] == CHECK_NAMES
    assert "no check failed" in result.stdout
    assert checks["cuda_tests"]["status"] == "skipped" and "no CUDA" in checks["cuda_tests"]["reason"]
    assert checks["cuda_tests"]["figures"]["skipped"] >= 7 and checks["cuda_tests"]["figures"]["passed"] == 0
    for name in CHECK_NAMES[1:]:
        assert checks[name]["status"] == "pass", checks[name]
        assert checks[name]["commands"] and all(c["returncode"] == 0 for c in checks[name]["commands"] if not c["stopped_at_budget"])
    assert report["dry_run"] is True and report["device"]["name"].startswith("CPU")
    assert report["total_seconds"] <= report["budget_s"]
    # no tiny Shakespeare anywhere: the check built a corpus, and says so
    assert "built character corpus" in report["data"] and "data: no tiny Shakespeare here" in result.stdout
    # the fixed costs were measured and printed; each check's time is split into start-up and work
    costs = report["fixed_costs"]
    assert all(costs[k] >= 0 for k in ("python_start_s", "import_torch_s", "import_repository_s", "import_transformers_s"))
    assert "fixed costs: python_start_s" in result.stdout
    for entry in report["checks"]:
        assert entry["startup_s"] > 0 and entry["work_s"] >= 0
    assert report["device"]["torch"] == torch.__version__ and report["device"]["transformers"]
    assert report["search_cut_short"] == {}


@pytest.mark.slow
def test_dry_run_report_folder_holds_only_reports_and_logs(dry_run):
    _, out, _, _, scratch_parent = dry_run
    files = [os.path.join(folder, name) for folder, _, names in os.walk(out) for name in names]
    assert files and all(f.endswith(REPORT_SUFFIXES) for f in files), files
    assert sum(os.path.getsize(f) for f in files) < 2**20
    assert not any(os.path.isdir(os.path.join(folder, d)) and d.endswith(".dcp") for folder, dirs, _ in os.walk(out) for d in dirs)
    assert not [d for d in os.listdir(scratch_parent) if d.startswith("gpu_check_")]  # the scratch folder is gone


@pytest.mark.slow
def test_dry_run_figures_are_what_the_scripts_measured(dry_run):
    _, out, _, checks, _ = dry_run
    bench = checks["bench"]
    assert [row["batch"] for row in bench["rows"]] == [2] and all(row["fits"] for row in bench["rows"])
    measured = read_jsonl(out / "bench" / "train_b2.jsonl")[-1]["result"]  # bench.py's own record
    assert bench["figures"]["batch_size"] == 2 and bench["figures"]["tokens_per_sec"] == measured["tokens_per_sec"]
    assert bench["figures"]["mfu"] is None  # no peak FLOPs for a CPU
    assert bench["figures"]["first_step_s"] == measured["first_step_s"] > 0 and bench["figures"]["search_cut_short"] is None

    attention = checks["attention"]["rows"]
    assert [row["T"] for row in attention] == [64, 512]
    assert all(row["window-blocked_ms"] > 0 for row in attention)
    assert all(row["auto_eager"] in ("dense", "blocked") and row["auto_compiled"] in ("dense", "blocked") for row in attention)

    decode = checks["decode"]["rows"]
    assert {row["batch"] for row in decode} == {1} and len(decode) == 3
    assert all(row["tokens_per_sec"] > 0 for row in decode)

    row, = checks["shakespeare"]["rows"]
    evals = [r["val_loss"] for r in read_jsonl(out / "shakespeare" / "learned.metrics.jsonl") if "val_loss" in r]
    assert row["stopped_at_budget"] and row["best_val_loss"] == min(evals) < evals[0]

    row, = checks["distributed"]["rows"]
    assert row["mode"] == "FSDP" and row["steps"] == 10 and row["last_loss"] < row["first_loss"]


@pytest.mark.slow
def test_dry_run_markdown_report(dry_run):
    _, out, report, _, _ = dry_run
    text = (out / "report.md").read_text()
    assert "python experiments/gpu_check.py --dry_run" in text and report["command"] in text
    assert datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d") in text and "CPU" in text
    assert f"torch {torch.__version__}" in text and "triton" in text and "driver" in text
    assert "- data: no tiny Shakespeare here" in text and "- fixed costs" in text and "batch search cut short: no" in text
    assert "| check | status | seconds | start-up s | work s |" in text and "| cuda_tests | skipped |" in text
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
    best, results, cut_short = gpu_check.search_largest_batch(fits_below(limit, calls), start, cap, lambda: True)
    assert best == expected and calls == tried and cut_short is None
    assert all((results[b] is not None) == (b <= limit) for b in tried)


def test_search_largest_batch_stops_when_time_runs_out():
    calls = []
    best, _, cut_short = gpu_check.search_largest_batch(fits_below(1000, calls), 16, 1024, lambda: len(calls) < 2)
    assert best == 32 and calls == [16, 32] and cut_short == "no time for batch 64"


@pytest.mark.parametrize("start, expected, tried", [
    (16, 32, [16, 32, 64]),  # the doubling's probe ran out of time: 32, which fit, stays
    (64, 32, [64, 32, 48]),  # the halving found 32; the probe halfway ran out of time
])
def test_search_keeps_what_fit_when_a_probe_is_cut_short(start, expected, tried):
    calls = []

    def fits(batch):
        calls.append(batch)
        if batch in (64, 48) and len(calls) > 1:
            raise gpu_check.SearchStopped("out of time")
        return dict(tokens_per_sec=1.0) if batch <= 40 else None

    best, results, cut_short = gpu_check.search_largest_batch(fits, start, 1024, lambda: True)
    assert best == expected and calls == tried and cut_short.endswith("out of time")
    assert results[expected] is not None


def test_first_batch_guess_leaves_room_for_a_doubling():
    assert gpu_check.first_batch_guess(139.8) == 64 and gpu_check.first_batch_guess(79.1) == 32
    assert gpu_check.first_batch_guess(16) == 8 and gpu_check.first_batch_guess(1) == 1


def test_rows_of_a_pytest_killed_midway():
    stdout = ("============ test session starts ============\n"
              "tests/test_cuda.py::test_a[cuda] PASSED                                  [ 20%]\n"
              "tests/test_cuda.py::test_b[cuda] SKIPPED (cuda: needs a CUDA GPU)        [ 40%]\n"
              "tests/test_cuda.py::test_c[cuda] FAILED                                  [ 60%]\n"
              "tests/test_cuda.py::test_d[cuda] ")
    rows = gpu_check.rows_from_pytest_output(stdout)
    assert [(r["test"], r["outcome"]) for r in rows] == [
        ("test_cuda.py::test_a[cuda]", "passed"), ("test_cuda.py::test_b[cuda]", "skipped"),
        ("test_cuda.py::test_c[cuda]", "failed"), ("test_cuda.py::test_d[cuda]", "running when killed")]
    assert rows[1]["message"] == "cuda: needs a CUDA GPU"


def test_cuda_test_files_are_those_that_mark_cuda():
    files = gpu_check.cuda_test_files()
    assert "tests/test_cuda.py" in files and "tests/test_gpu_check.py" not in files


def run_state(tmp_path, **kwargs):
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return gpu_check.RunState(str(scratch), str(tmp_path / "no_data"), **kwargs)


def context(tmp_path, seconds, name="t", state=None):
    return gpu_check.CheckContext(name, str(tmp_path), time.monotonic() + seconds, True, state or run_state(tmp_path), {})


def test_data_from_a_given_input_txt_is_prepared_outside_the_report(tmp_path):
    state = run_state(tmp_path, shakespeare_txt=shakespeare_input())
    c = context(tmp_path / "out", 60, "shakespeare", state)
    root = gpu_check.prepared_data(c)
    assert root.startswith(state.scratch) and shakespeare_input() in state.data["source"]
    assert all((tmp_path / "scratch" / "shakespeare" / "data" / "shakespeare_char" / f).exists() for f in ("train.bin", "meta.json"))
    assert sorted(os.listdir(c.folder)) == ["prepare.err", "prepare.out"]  # only logs in the report folder
    # a data root with shakespeare_char prepared is used as it is, nothing run
    again = context(tmp_path / "out", 60, "distributed", gpu_check.RunState(state.scratch, root))
    assert gpu_check.prepared_data(again) == root and not again.commands and "prepared in" in again.run_state.data["source"]


def test_the_start_up_estimate_counts_each_process():
    state = gpu_check.RunState("s", "d", fixed_costs=dict(python_start_s=0.1, import_torch_s=2.0, import_repository_s=0.5,
                                                          import_transformers_s=3.0))
    assert state.startup_estimate([sys.executable, "bench.py", "--mode=train"]) == 2.6
    assert state.startup_estimate([sys.executable, "bench.py", "--vs_transformers=True"]) == 5.6
    assert state.startup_estimate([sys.executable, "-m", "torch.distributed.run", "train.py"]) == 4.7
    assert state.startup_estimate([sys.executable, "prepare.py"]) == 0.1
    assert gpu_check.RunState("s", "d").startup_estimate(["train.py"]) is None


# torch names the repository may use that torch 2.6, the oldest requirements.txt allows, does not have; the test below
# hides them and imports every module. It covers attributes only: a keyword argument or a behaviour that changed
# after 2.6 is not seen (docs/gpu_check.md says so)
NEWER_THAN_TORCH_2_6 = {"torch.optim.Muon": "2.9", "torch.optim._muon": "2.9"}

HIDE_AND_IMPORT = """
import sys, importlib, torch
for dotted in {hidden!r}:
    owner, name = dotted.rsplit(".", 1)
    parent = importlib.import_module(owner)
    if hasattr(parent, name):
        delattr(parent, name)
    sys.modules[dotted] = None  # 'import torch.optim._muon' fails as it would on 2.6
sys.path.insert(0, "experiments")
for module in {modules!r}:
    importlib.import_module(module)
print("imported", len({modules!r}))
"""


def test_every_module_imports_with_the_torch_2_6_api():
    """What the dry run imports, in its processes and in gpu_check's, with the newer names hidden: scripts and modules
    that need them must check for them (as optimizers.muon_available does), not fail to import."""
    existing = [name for name in NEWER_THAN_TORCH_2_6 if hasattr(__import__("importlib").import_module(name.rsplit(".", 1)[0]),
                                                                   name.rsplit(".", 1)[1])]
    assert existing, "none of the hidden names exists in this torch: the list is out of date"
    modules = sorted(name[:-3] for name in os.listdir(REPO) if name.endswith(".py")) + ["gpu_check"]
    code = HIDE_AND_IMPORT.format(hidden=list(NEWER_THAN_TORCH_2_6), modules=modules)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=script_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"imported {len(modules)}" in result.stdout


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
    gpu_check.run_checks(checks, str(tmp_path), True, run_state(tmp_path), report["device"], report)
    entries = json.loads((tmp_path / "report.json").read_text())["checks"]
    assert [(e["name"], e["status"]) for e in entries] == [("one", "fail"), ("two", "fail"), ("three", "pass")]
    assert entries[0]["error"] == "bench.py --batch_size=8: exit 1 (boom)" and entries[0]["figures"] == dict(batch_size=None)
    assert "KeyError" in entries[1]["error"] and "Traceback" in entries[1]["traceback"]
    assert entries[2]["commands"][0]["returncode"] == 0 and (tmp_path / "three" / "hello.out").read_text() == "hello\n"
    text = (tmp_path / "report.md").read_text()
    assert "| one | fail |" in text and "error: bench.py --batch_size=8: exit 1 (boom)" in text and "| three | pass |" in text
    assert "x\\|y" in text  # a cell's | does not break the table


def gpu_check_main(monkeypatch, capsys, *args):
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
    assert_one_line(*gpu_check_main(monkeypatch, capsys, f"--out={tmp_path / 'report'}"), "no CUDA GPU", "--dry_run")
    assert not (tmp_path / "report").exists()


def test_unknown_check_is_one_line(tmp_path, monkeypatch, capsys):
    code, stderr = gpu_check_main(monkeypatch, capsys, "--dry_run", "--only=bench,speed", f"--out={tmp_path / 'report'}")
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
    gpu_check.run_checks(checks, str(tmp_path), True, run_state(tmp_path), report["device"], report)
    assert time.monotonic() - start < 10
    first, second = report["checks"]
    assert first["status"] == "fail" and "out of time" in first["error"] and first["commands"][0]["timed_out"]
    assert second["status"] == "fail" and "no time left" in second["error"] and not second["commands"]
