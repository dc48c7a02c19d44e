"""
The GPU paths in one command: the cuda tests (which also run Muon, a compiled rope + window training step
with FlexAttention inside the graph, gradient checkpointing and an asynchronous sharded save), the training
step's MFU and compile time, the attention kernels, decoding, a real training run and DDP/FSDP2 under
torchrun. At most 8 minutes on one H100/H200; each check has its own time budget and its subprocesses their
own timeouts, a failing check is recorded and the next one runs, and the reports (report.json, report.md)
are rewritten after every check, so even a run cut short leaves what it measured.

    python experiments/gpu_check.py --out=gpu_report                  # on the GPU
    python experiments/gpu_check.py --dry_run --out=gpu_dry_run       # every check's code path, tiny sizes, on a CPU
    python experiments/gpu_check.py --out=gpu_report --only=bench,decode   # some checks again

The checks run the repository's own scripts with their command-line settings (pytest, bench.py,
train.py, torchrun train.py) and read what those write. Nothing needs a network: tiny Shakespeare is
found where the tests find it, or a small character corpus is built. Checkpoints and scratch files go to
a temporary folder; --out receives only reports and logs. The dry run gives the checks tiny models; what
only CUDA has (the cuda tests, FlexAttention's backward, torch.compile's kernels, NCCL) it names and
skips. docs/gpu_check.md says what each check measures and what does not run.
"""

import os
import re
import sys
import json
import time
import shlex
import random
import shutil
import signal
import argparse
import platform
import tempfile
import importlib.util
import importlib.metadata
import datetime
import statistics
import subprocess
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import UserError, run_main  # noqa: E402

TOTAL_BUDGET_S = 480  # the promise: 8 minutes on one H100/H200
DRY_TOTAL_BUDGET_S = 300  # 2 shared CPU cores: slow start-ups, no promise but a bound
MFU_GOAL, MFU_AIM = 0.40, 0.50  # llm.c reaches ~40% on an H100, build-nanogpt ~50% on an A100
SHAKESPEARE_BUDGET_S, SHAKESPEARE_DRY_BUDGET_S = 36, 3  # wall time of the real run, from launch
SHAKESPEARE_ANCHOR = "nanoGPT's baby GPT: val loss 1.4697 after 5000 steps, about 3 minutes on an A100"
GIB_PER_SAMPLE_GUESS = 1.0  # GPT-2 124M, T=1024, bf16, compiled: ~0.7 GiB of activations and logits a sequence
CUDA_TEST_TIMEOUT_S = 75  # pytest-timeout's limit for one cuda test: a cold compile, or a torchrun start with NCCL
SHARED_SHAKESPEARE = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare", "input.txt")  # where the tests look

# GPT-2 124M shapes, spelled out so that a change of bench.py's defaults cannot change the figure
GPT2_SMALL = ["--n_layer=12", "--n_head=12", "--n_embd=768", "--block_size=1024", "--vocab_size=50304"]
TINY_MODEL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--vocab_size=64"]
TINY_TRAIN = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
              "--batch_size=4"]


class CheckFailed(Exception):
    """What went wrong in a check, in one message (the log files hold the rest)."""


# -----------------------------------------------------------------------------
# running the repository's scripts

@dataclass
class Completed:
    command: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False
    stopped: bool = False  # sent SIGTERM when its time budget ran out

    def error_tail(self, lines=6):
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return " / ".join(line.strip() for line in text[-lines:] if line.strip())

    @property
    def out_of_memory(self):
        return re.search(r"out of memory|OutOfMemoryError", self.stderr, re.IGNORECASE) is not None

    def why(self):
        """Why it did not succeed, in a few words."""
        if self.timed_out:
            return "out of time"
        return "out of memory" if self.out_of_memory else f"exit {self.returncode}"

    def failure(self, lines=2):
        return f"{self.why()} ({self.error_tail(lines)})"


class CheckContext:
    """One check's folder, deadline and log of commands."""

    def __init__(self, name, out, deadline, dry_run, run_state, device):
        self.name, self.out, self.deadline, self.dry_run = name, out, deadline, dry_run
        self.run_state, self.device = run_state, device
        self.folder = os.path.join(out, name)
        os.makedirs(self.folder, exist_ok=True)
        self.commands = []
        self.notes = []

    def path(self, *parts):
        """A report or log in --out."""
        return os.path.join(self.folder, *parts)

    def scratch(self, *parts):
        """Checkpoints and other files that are not reports: the run's temporary folder, outside --out."""
        folder = os.path.join(self.run_state.scratch, self.name)
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, *parts)

    def keep_log(self, source, label):
        """A copy of a log a script wrote into its scratch folder (train.py's metrics.jsonl), in --out."""
        if os.path.exists(source):
            shutil.copyfile(source, self.path(label))

    def share_of_time(self, runs_left, reserve_s):
        """The time the next of runs_left runs may take: all that is left but reserve_s for each run after it,
        so the first run (the one that pays the cold start) is not starved by an equal split."""
        return max(self.time_left() - reserve_s * (runs_left - 1), self.time_left() / runs_left)

    def time_left(self):
        return self.deadline - time.monotonic()

    def run(self, args, label, timeout=None, stop_after=None, ready=None):
        """
        Run args from the repository root, stdout and stderr into this check's folder. The run is killed
        (its whole process group) at the check's deadline or after `timeout` seconds, whichever is first.
        With stop_after it is sent SIGTERM after that many seconds, once ready() says it is under way
        (train.py then saves a checkpoint and stops at the next step boundary).
        """
        limit = self.time_left() if timeout is None else min(timeout, self.time_left())
        if limit <= 1:
            raise CheckFailed(f"no time left in this check's budget for {label}")
        command = " ".join("python" if a == sys.executable else shlex.quote(a) for a in args)
        out_path, err_path = self.path(f"{label}.out"), self.path(f"{label}.err")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        start = time.monotonic()
        stopped = timed_out = False
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
            try:
                while proc.poll() is None:
                    elapsed = time.monotonic() - start
                    if elapsed > limit:
                        timed_out = True
                        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's and pytest's children too
                        proc.wait()
                        break
                    if stop_after is not None and not stopped and elapsed > stop_after and (ready is None or ready()):
                        stopped = True
                        proc.send_signal(signal.SIGTERM)
                    time.sleep(0.2)
            finally:
                try:  # whatever it left behind (a worker of torchrun, a compile worker) would hold the GPU's memory
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        with open(out_path) as f:
            stdout = f.read()
        with open(err_path) as f:
            stderr = f.read()
        result = Completed(command, proc.returncode, stdout, stderr, time.monotonic() - start, timed_out, stopped)
        self.commands.append(dict(command=command, returncode=result.returncode, seconds=round(result.seconds, 1),
                                  startup_s=self.run_state.startup_estimate(args), timed_out=timed_out,
                                  stopped_at_budget=stopped, log=os.path.relpath(out_path, self.out)))
        return result

    def run_ok(self, args, label, **kwargs):
        result = self.run(args, label, **kwargs)
        if result.timed_out or result.returncode != 0:
            raise CheckFailed(f"{label}: {result.failure(6)}")
        return result


def read_json_lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fresh_file(path):
    """bench.py and train.py append to their JSON lines: every run here starts from an empty one."""
    if os.path.exists(path):
        os.remove(path)
    return path


# -----------------------------------------------------------------------------
# the checks

PYTEST_LINE = re.compile(r"^(tests/\S+::\S+)(?: (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b(.*))?$")


def cuda_test_files():
    """The test files that mark a test cuda: collecting only these saves importing the whole suite."""
    folder = os.path.join(REPO, "tests")
    files = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                if "mark.cuda" in f.read():
                    files.append(f"tests/{name}")
    return files


def rows_from_pytest_output(stdout):
    """One row per test from pytest -v's progress lines, which are written as each test ends: a run killed at
    its budget keeps the rows of the tests that finished, and the test that was running is named."""
    rows = []
    for line in stdout.splitlines():
        match = PYTEST_LINE.match(line.strip())
        if match:
            test, outcome, rest = match.groups()
            rows.append(dict(test=test.split("/")[-1], outcome=(outcome or "running when killed").lower(), seconds=None,
                             message=(rest or "").strip(" -()[]%0123456789")[:300]))
    return rows


def rows_from_junit(xml_path):
    rows = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            element = case.find(tag)
            if element is not None:
                outcome, message = name, (element.get("message") or element.text or "").strip()
        rows.append(dict(test=f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}", outcome=outcome,
                         seconds=round(float(case.get("time") or 0), 2), message=message.splitlines()[0][:300] if message else ""))
    return rows


def check_cuda_tests(c):
    """pytest -m cuda over the files that have cuda tests, each test under pytest-timeout's limit when it is installed;
    one row per test from pytest's JUnit XML, or from its progress lines when it was killed before writing that."""
    xml_path = fresh_file(c.path("cuda_tests.xml"))
    args = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rA", "-p", "no:cacheprovider", f"--junitxml={xml_path}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        args += [f"--timeout={CUDA_TEST_TIMEOUT_S}"]
    else:
        c.notes.append("pytest-timeout is not installed: no limit per test; the check's budget stops pytest, and the rows "
                       "of the tests that finished stay")
    result = c.run([*args, *cuda_test_files()], "pytest")
    rows = rows_from_junit(xml_path) if os.path.exists(xml_path) else rows_from_pytest_output(result.stdout)
    counts = {o: sum(r["outcome"] == o for r in rows) for o in ("passed", "failed", "error", "skipped")}
    figures = dict(counts, tests=len(rows))
    if result.timed_out:
        raise CheckFailed(f"pytest -m cuda ran out of time after {result.seconds:.0f} s: {result.error_tail()}",
                          dict(figures=figures, rows=rows))
    if not rows:
        raise CheckFailed(f"no test is marked cuda (pytest exit {result.returncode}): {result.error_tail()}")
    bad = [r for r in rows if r["outcome"] in ("failed", "error")]
    if bad:
        raise CheckFailed(f"{len(bad)} cuda test(s) failed: " + "; ".join(f"{r['test']}: {r['message']}" for r in bad[:5]),
                          dict(figures=figures, rows=rows))
    if result.returncode != 0:
        raise CheckFailed(f"pytest exit {result.returncode}: {result.error_tail()}", dict(figures=figures, rows=rows))
    if counts["passed"] == 0:
        return dict(status="skipped", figures=figures, rows=rows,
                    reason=f"no CUDA here: all {counts['skipped']} cuda tests were collected and skipped")
    return dict(status="pass", figures=figures, rows=rows)


class SearchStopped(Exception):
    """A probe of the batch search that neither fit nor ran out of memory (out of time, another failure)."""


def search_largest_batch(fits: Callable[[int], dict | None], start: int, cap: int, can_try_another: Callable[[], bool]):
    """
    The largest batch size for which fits(batch) returns a result (None: out of memory). Doubles up from
    start while runs fit (halves down while they do not), up to cap, then tries once halfway between the
    largest batch that fit and the smallest that did not, as long as can_try_another() allows. A probe that
    raises SearchStopped ends the search and the batches that fit are kept.
    Returns (best batch or None, {batch: result or None} for every batch tried, why the search was cut short or None).
    """
    tried, cut_short = {}, []

    def attempt(batch):
        if cut_short:
            return False
        if not can_try_another():
            cut_short.append(f"no time for batch {batch}")
            return False
        try:
            tried[batch] = fits(batch)
        except SearchStopped as e:
            tried[batch] = None
            cut_short.append(f"batch {batch}: {e}")
            return False
        return tried[batch] is not None

    batch = start
    if attempt(batch):
        while batch * 2 <= cap and attempt(batch * 2):
            batch *= 2
    else:
        while batch > 1 and not cut_short:
            batch //= 2
            if attempt(batch):
                break
    fitting = [b for b, r in tried.items() if r is not None]
    best = max(fitting) if fitting else None
    too_big = [b for b, r in tried.items() if r is None and best is not None and b > best]
    if too_big and not cut_short:
        middle = (best + min(too_big)) // 2
        if middle > best and attempt(middle):
            best = middle
    return best, tried, (cut_short[0] if cut_short else None)


def first_batch_guess(memory_gib):
    """Half of what the GPU's memory would hold by GIB_PER_SAMPLE_GUESS, as a power of two: likely to fit, so the
    first probe (the one that pays the cold compile) measures something, and one doubling is left to try."""
    return 2 ** max(0, int(memory_gib / GIB_PER_SAMPLE_GUESS / 2).bit_length() - 1)


def check_bench(c):
    """bench.py's training step, GPT-2 124M at T=1024, bf16, compiled, at the largest batch that fits; the first
    step's time apart (with torch.compile: the compilation)."""
    if c.dry_run:
        settings = [*TINY_MODEL, "--device=cpu", "--dtype=bfloat16", "--compile=False", "--warmup_steps=1", "--steps=2"]
        start = cap = 2
        c.notes.append("dry run: a tiny model on the CPU without torch.compile (a cold compile costs ~35 s on 2 shared cores), "
                       "one batch size (the search is tested in-process); MFU needs a GPU's peak FLOPs")
    else:
        settings = [*GPT2_SMALL, "--device=cuda", "--dtype=bfloat16", "--compile=True", "--warmup_steps=3", "--steps=10"]
        start, cap = first_batch_guess(c.device.get("memory_gib") or 16), 1024
    longest = [0.0]

    def fits(batch):
        json_out = fresh_file(c.path(f"train_b{batch}.jsonl"))
        result = c.run([sys.executable, "bench.py", "--mode=train", *settings, f"--batch_size={batch}", f"--json_out={json_out}"],
                       f"bench_b{batch}")
        longest[0] = max(longest[0], result.seconds)
        if result.returncode == 0 and not result.timed_out:
            return read_json_lines(json_out)[-1]["result"]
        if result.why() == "out of memory":
            return None
        raise SearchStopped(result.failure(6))

    best, tried, cut_short = search_largest_batch(fits, start, cap, lambda: c.time_left() > 1.2 * longest[0] + 5)
    rows = [dict(batch=b, fits=r is not None, **({k: r.get(k) for k in ("tokens_per_sec", "ms_per_iter", "peak_mem_mib", "mfu",
                                                                          "first_step_s")} if r else {}))
            for b, r in sorted(tried.items())]
    if best is None:
        raise CheckFailed(f"no batch size fits (tried {sorted(tried)})" + (f"; {cut_short}" if cut_short else ""),
                          dict(rows=rows, search_cut_short=cut_short))
    r = tried[best]
    figures = dict(batch_size=best, seq_len=32 if c.dry_run else 1024, tokens_per_sec=r["tokens_per_sec"], ms_per_step=r["ms_per_iter"],
                   peak_mem_mib=r["peak_mem_mib"], mfu=r["mfu"], peak_bf16_flops=c.device.get("peak_bf16_flops"),
                   flops_per_token=r["flops_per_token"], params=r["params"], search_cut_short=cut_short)
    # the first step minus a timed one: the compilation (and the allocator's first growth) on its own
    first_steps = [row["first_step_s"] for row in rows if row.get("first_step_s") is not None]
    if r.get("first_step_s") is not None:
        figures["first_step_s"] = r["first_step_s"]
        figures["compile_s" if not c.dry_run else "first_step_overhead_s"] = r["first_step_s"] - r["ms_per_iter"] / 1000
    if first_steps:
        figures["slowest_first_step_s"] = max(first_steps)
    if r["mfu"] is not None:
        figures.update(mfu_goal=MFU_GOAL, mfu_aim=MFU_AIM, mfu_goal_met=r["mfu"] >= MFU_GOAL, mfu_aim_met=r["mfu"] >= MFU_AIM)
    elif not c.dry_run:
        c.notes.append(f"no MFU: {c.device.get('name')} is not in common.PEAK_TRAINING_FLOPS")
    if cut_short:
        c.notes.append(f"the batch search was cut short ({cut_short}); the largest batch that fit before is reported")
    return dict(status="pass", figures=figures, rows=rows, search_cut_short=cut_short)


ATTENTION_KERNELS = (("flex_window_attention", "flex"), ("blocked_local_attention", "blocked"), ("dense_attention", "dense"))


def auto_picks(seq_lens, window, device):
    """
    Which kernel causal_attention's impl='auto' runs at each T, called directly (eager) and inside
    torch.compile (the only place it picks FlexAttention). The kernels are swapped for recorders that
    return zeros: only the choice is wanted, so nothing here is timed and nothing heavy runs.
    """
    import torch
    import attention
    chosen = []

    def recorder(label):
        def record(q, *args, **kwargs):
            chosen.append(label)
            return torch.zeros_like(q)
        return record

    originals = {name: getattr(attention, name) for name, _ in ATTENTION_KERNELS}
    rows = []
    try:
        for name, label in ATTENTION_KERNELS:
            setattr(attention, name, recorder(label))
        for T in seq_lens:
            q = torch.zeros(1, 1, T, 16, device=device, dtype=torch.bfloat16)
            row = dict(T=T)
            for mode in ("eager", "compiled"):
                chosen.clear()
                torch.compiler.reset()
                attend = attention.causal_attention if mode == "eager" else torch.compile(attention.causal_attention, backend="eager")
                attend(q, q, q, window, "auto")
                row[f"auto_{mode}"] = "+".join(chosen) or "?"
            rows.append(row)
    finally:
        for name, original in originals.items():
            setattr(attention, name, original)
        torch.compiler.reset()
    return rows


BENCH_ATTENTION_ROW = re.compile(r"T=\s*(\d+)\s+(\S+)\s+([\d.]+) ms\s+peak\s+([\d.]+) MiB")


def check_attention(c):
    """bench.py --mode=attention: full causal (SDPA) vs window via FlexAttention and via the blocked kernel,
    forward + backward, bf16, W=256, one process per kernel (one that runs out of memory keeps its shorter rows)."""
    if c.dry_run:
        seq_lens, window, impls = (64, 512), 16, ("window-blocked",)
        settings = [*TINY_MODEL, "--device=cpu", "--dtype=bfloat16"]
        c.notes.append("dry run: window-flex skipped (FlexAttention has no backward on a CPU; bench.py needs CUDA for it); "
                       "full skipped (the same code path here as window-blocked, one process less)")
    else:
        seq_lens, window, impls = (1024, 2048, 4096, 8192, 16384, 32768), 256, ("full", "window-blocked", "window-flex")
        settings = [*GPT2_SMALL, "--device=cuda", "--dtype=bfloat16"]
        c.notes.append("window-flex is FlexAttention as bench.py calls it, without torch.compile (its unfused path); "
                       "training under torch.compile runs the fused block-sparse kernel")
    traced = time.monotonic()
    picks = {row["T"]: row for row in auto_picks(seq_lens, window, "cpu" if c.dry_run else "cuda")}
    c.notes.append(f"which kernel auto picks: {2 * len(seq_lens)} calls, half of them traced by torch.compile (no code "
                   f"generated), in {time.monotonic() - traced:.1f} s in this process")
    timings, failures = {}, []
    for i, impl in enumerate(impls):  # FlexAttention last: where its unfused path is slow, it uses what is left
        json_out = fresh_file(c.path(f"{impl}.jsonl"))
        result = c.run([sys.executable, "bench.py", "--mode=attention", *settings, f"--seq_lens={tuple(seq_lens)}",
                        f"--bench_window={window}", f'--impls=("{impl}",)', "--attn_repeats=3", f"--json_out={json_out}"],
                       impl, timeout=c.share_of_time(len(impls) - i, reserve_s=8))
        if result.returncode == 0 and not result.timed_out:
            for row in read_json_lines(json_out)[-1]["result"]:
                timings[(row["T"], impl)] = (row["ms_fwd_bwd"], row["peak_mem_mib"])
            continue
        for T, name, ms, mib in BENCH_ATTENTION_ROW.findall(result.stdout):  # the rows it printed before it stopped
            timings[(int(T), name)] = (float(ms), float(mib))
        done = sorted(T for T, name in timings if name == impl)
        message = f"{impl}: {result.why()} after T={done[-1] if done else 'none'} ({result.error_tail(2)})"
        # the uncompiled FlexAttention is quadratic in memory: running out of memory or time at long T is a finding,
        # anything else (or no row at all) a failure
        if impl == "window-flex" and done and result.why() in ("out of memory", "out of time"):
            c.notes.append(message)
        else:
            failures.append(message)
    rows = []
    for T in seq_lens:
        row = dict(T=T, window=window)
        for impl in impls:
            ms, mib = timings.get((T, impl), (None, None))
            row[f"{impl}_ms"], row[f"{impl}_mib"] = ms, mib
        row.update(auto_eager=picks[T]["auto_eager"], auto_compiled=picks[T]["auto_compiled"])
        rows.append(row)
    longest = max(seq_lens)
    figures = {f"{impl}_ms_at_T{longest}": timings.get((longest, impl), (None,))[0] for impl in impls}
    figures[f"auto_compiled_at_T{longest}"] = picks[longest]["auto_compiled"]
    if failures:
        raise CheckFailed("; ".join(failures), dict(figures=figures, rows=rows))
    return dict(status="pass", figures=figures, rows=rows)


def check_decode(c):
    """bench.py --mode=generate, greedy, bf16: with and without the KV cache, and transformers' generate on the same weights."""
    if c.dry_run:
        settings, new_tokens, prompt_len = [*TINY_MODEL, "--device=cpu"], 8, 4
    else:
        settings, new_tokens, prompt_len = [*GPT2_SMALL, "--device=cuda"], 256, 16
    common_args = [*settings, "--dtype=bfloat16", f"--new_tokens={new_tokens}", f"--prompt_len={prompt_len}"]
    if c.dry_run:  # one batch size: the same code path for both
        runs = [(1, path) for path in ("cached", "vs_transformers")]
        c.notes.append("dry run: batch 1, without the uncached run (the same code path here as the cached one)")
    else:  # transformers once, at batch 1: building, saving and reloading a 124M model twice costs more than it tells
        runs = [(1, "cached"), (1, "uncached"), (1, "vs_transformers"), (32, "cached"), (32, "uncached")]
    rows, failures = [], []
    for i, (batch, path) in enumerate(runs):
        extra = {"cached": [], "uncached": ["--use_cache=False"], "vs_transformers": ["--vs_transformers=True"]}[path]
        json_out = fresh_file(c.path(f"{path}_b{batch}.jsonl"))
        result = c.run([sys.executable, "bench.py", "--mode=generate", *common_args, f"--gen_batch_size={batch}", *extra,
                        f"--json_out={json_out}"], f"{path}_b{batch}", timeout=c.share_of_time(len(runs) - i, reserve_s=8))
        if result.returncode != 0 or result.timed_out:
            failures.append(f"batch {batch} {path}: {result.failure()}")
            continue
        r = read_json_lines(json_out)[-1]["result"]
        if path == "vs_transformers":
            rows.append(dict(batch=batch, path="ours (bf16 weights)", tokens_per_sec=r["tokens_per_sec"]))
            rows.append(dict(batch=batch, path="transformers generate (bf16 weights)", tokens_per_sec=r["transformers_tokens_per_sec"],
                             ours_vs_transformers=r["speedup_vs_transformers"],
                             identical_new_tokens=f"{r['identical_new_tokens']}/{new_tokens}"))
        else:
            rows.append(dict(batch=batch, path=f"ours, bf16 autocast, {'KV cache' if path == 'cached' else 'no cache'}",
                             tokens_per_sec=r["tokens_per_sec"], peak_mem_mib=r["peak_mem_mib"]))
    figures = dict(new_tokens=new_tokens, prompt_len=prompt_len)
    for batch in (1, 32):
        tps = {row["path"].split(",")[-1].strip(): row["tokens_per_sec"] for row in rows if row["batch"] == batch}
        figures[f"b{batch}_cached_tokens_per_sec"] = tps.get("KV cache")
        if tps.get("KV cache") and tps.get("no cache"):
            figures[f"b{batch}_cache_speedup"] = tps["KV cache"] / tps["no cache"]
        versus = [row for row in rows if row["batch"] == batch and "ours_vs_transformers" in row]
        if versus:
            figures[f"b{batch}_ours_vs_transformers"] = versus[0]["ours_vs_transformers"]
    if failures:
        raise CheckFailed("; ".join(failures), dict(figures=figures, rows=rows))
    return dict(status="pass", figures=figures, rows=rows)


def training_summary(out_dir):
    """What a train.py run logged: losses, evaluations and step times from its metrics.jsonl."""
    records = read_json_lines(os.path.join(out_dir, "metrics.jsonl"))
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    summary = dict(steps=len(steps), first_loss=steps[0]["loss"] if steps else None, last_loss=steps[-1]["loss"] if steps else None)
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        summary.update(first_val_loss=evals[0]["val_loss"], best_val_loss=best["val_loss"], best_at_iter=best["iter"])
    if len(steps) > 2:  # the first steps compile and warm up
        later = steps[len(steps) // 2:]
        summary["median_ms_per_step"] = statistics.median(r["ms"] for r in later)
        summary["median_tokens_per_sec"] = statistics.median(r["tokens_per_sec"] for r in later)
        mfus = [r["mfu"] for r in later if "mfu" in r]
        if mfus:
            summary["median_mfu"] = statistics.median(mfus)
    return summary


def prepared_data(c):
    """A data root with shakespeare_char prepared (found once per run; the report says where it came from)."""
    run = c.run_state
    if run.data is None:
        run.data = find_data(c, run.data_root, run.shakespeare_txt)
        print(f"   data: {run.data['source']}", flush=True)
    return run.data["root"]


def find_data(c, data_root, text_path):
    """
    Tiny Shakespeare for the training checks, without a network: a data root where shakespeare_char is already
    prepared, else input.txt from --shakespeare_txt, the data root's shakespeare_char/ or ../shared (where the tests
    find it) prepared by its own prepare.py in the scratch folder, else a character corpus built here. Returns
    {root, source}.
    """
    folder = os.path.join(data_root, "shakespeare_char")
    if all(os.path.exists(os.path.join(folder, f)) for f in ("train.bin", "val.bin", "meta.json")):
        return dict(root=data_root, source=f"tiny Shakespeare prepared in {folder}")
    texts = [text_path, os.path.join(folder, "input.txt"), SHARED_SHAKESPEARE]
    found = next((t for t in texts if t and os.path.isfile(t)), None)
    prepared = c.scratch("data", "shakespeare_char")
    os.makedirs(prepared, exist_ok=True)
    if found is not None:
        shutil.copyfile(found, os.path.join(prepared, "input.txt"))
        source = f"tiny Shakespeare from {found}, prepared in the scratch folder"
    else:
        chars = write_character_corpus(os.path.join(prepared, "input.txt"))
        source = (f"no tiny Shakespeare here (looked in {folder} and {SHARED_SHAKESPEARE}): a built character corpus "
                  f"of {chars:,} characters, so losses are not comparable with tiny Shakespeare's")
    shutil.copyfile(os.path.join(REPO, "data", "shakespeare_char", "prepare.py"), os.path.join(prepared, "prepare.py"))
    c.run_ok([sys.executable, os.path.join(prepared, "prepare.py")], "prepare", timeout=120)
    return dict(root=os.path.dirname(prepared), source=source)


def write_character_corpus(path, chars=300_000, seed=0):
    """Play-like text with a small vocabulary: learnable in a few hundred steps, like tiny Shakespeare."""
    rng = random.Random(seed)
    names = ["ROMEO", "JULIET", "HAMLET", "OPHELIA", "KING", "QUEEN", "NURSE", "FRIAR"]
    words = ("the and to of my a i you that in is not with it me be his your this but he have as thou so will what "
             "thy her do no by all shall lord good love now come sir more o here if our know well let they").split()
    parts, size = [], 0
    while size < chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        part = f"{rng.choice(names)}:\n{line[0].upper()}{line[1:]}{rng.choice('.,!?;')}\n\n"
        parts.append(part)
        size += len(part)
    with open(path, "w") as f:
        f.write("".join(parts))
    return size


def check_shakespeare(c):
    """config/train_shakespeare_char.py, stopped (SIGTERM: train.py checkpoints and stops) after a fixed wall-time
    budget from launch."""
    data_root = prepared_data(c)
    if c.dry_run:
        extra = [*TINY_TRAIN, "--dtype=float32", "--warmup_iters=2", "--eval_interval=5", "--eval_iters=2", "--log_interval=1"]
    else:  # compiling the training and evaluation graphs would take most of the budget; the bench check measures compile
        extra = ["--compile=False"]
        c.notes.append(f"{SHAKESPEARE_BUDGET_S} s of wall time from launch, without torch.compile; rope in training is "
                       "run by the cuda tests (compiled, with a window)")
    budget = SHAKESPEARE_DRY_BUDGET_S if c.dry_run else SHAKESPEARE_BUDGET_S
    rows, failures = [], []
    name = "learned positions"
    out_dir = c.scratch("learned")
    shutil.rmtree(out_dir, ignore_errors=True)  # a run of its own: no metrics or checkpoint of an earlier one
    metrics = os.path.join(out_dir, "metrics.jsonl")
    # the budget runs from launch, but the stop waits for the first step: a signal before train.py is ready would kill it.
    # The dry run's budget is a few seconds on shared cores, so there the stop also waits for a second evaluation
    evaluations_needed = 2 if c.dry_run else 0
    started = lambda: (any("loss" in r for r in read_json_lines(metrics))
                       and sum("val_loss" in r for r in read_json_lines(metrics)) >= evaluations_needed)
    result = c.run([sys.executable, "train.py", "config/train_shakespeare_char.py", *extra, f"--data_root={data_root}",
                    f"--out_dir={out_dir}"], "learned", stop_after=budget, ready=started)
    c.keep_log(metrics, "learned.metrics.jsonl")
    summary = training_summary(out_dir)
    rows.append(dict(run=name, wall_s=round(result.seconds, 1), budget_s=round(budget, 1), stopped_at_budget=result.stopped,
                     **{k: summary.get(k) for k in ("steps", "best_val_loss", "best_at_iter", "first_val_loss",
                                                      "median_ms_per_step", "median_mfu")}))
    if result.timed_out or (not result.stopped and result.returncode != 0):
        failures.append(f"{name}: {result.failure()}")
    elif "best_val_loss" not in summary:
        failures.append(f"{name}: no evaluation before the budget ran out")
    elif summary["best_val_loss"] >= summary["first_val_loss"]:
        failures.append(f"{name}: val loss did not improve ({summary['first_val_loss']:.4f} -> {summary['best_val_loss']:.4f})")
    figures = {f"{row['run']} best_val_loss": row["best_val_loss"] for row in rows}
    figures["anchor"] = SHAKESPEARE_ANCHOR
    if failures:
        raise CheckFailed("; ".join(failures), dict(figures=figures, rows=rows))
    return dict(status="pass", figures=figures, rows=rows)


def check_distributed(c):
    """torchrun --nproc_per_node=1 train.py, DDP then FSDP2, bf16 (FSDP2: its mixed-precision policy), a few steps
    (the dry run: FSDP2 only, on gloo; DDP's and FSDP's gloo runs are in the suite)."""
    data_root = prepared_data(c)
    steps = 10 if c.dry_run else 20
    extra = TINY_TRAIN if c.dry_run else ["--compile=False"]
    modes = (("FSDP", ["--fsdp=True"]),) if c.dry_run else (("DDP", []), ("FSDP", ["--fsdp=True"]))
    if c.dry_run:
        c.notes.append("dry run: FSDP2 only, gloo on the CPU instead of NCCL")
    rows, failures = [], []
    for i, (name, flags) in enumerate(modes):
        out_dir = c.scratch(name.lower())
        shutil.rmtree(out_dir, ignore_errors=True)
        result = c.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
                        "config/train_shakespeare_char.py", *extra, *flags, "--dtype=bfloat16", f"--max_iters={steps}",
                        "--warmup_iters=2", f"--lr_decay_iters={steps}",
                        f"--eval_interval={steps}", "--eval_iters=5", "--log_interval=1", f"--data_root={data_root}",
                        f"--out_dir={out_dir}"], name.lower(), timeout=c.share_of_time(len(modes) - i, reserve_s=15))
        c.keep_log(os.path.join(out_dir, "metrics.jsonl"), f"{name.lower()}.metrics.jsonl")
        summary = training_summary(out_dir)
        mode_line = next((line for line in result.stdout.splitlines() if line.startswith(f"{name} on 1")), None)
        rows.append(dict(mode=name, steps=summary["steps"], first_loss=summary["first_loss"], last_loss=summary["last_loss"],
                         val_loss=summary.get("best_val_loss"), median_tokens_per_sec=summary.get("median_tokens_per_sec"),
                         median_mfu=summary.get("median_mfu"), wall_s=round(result.seconds, 1)))
        if result.returncode != 0 or result.timed_out:
            failures.append(f"{name}: {result.failure()}")
        elif mode_line is None:
            failures.append(f"{name}: train.py did not report running as {name} on 1 process")
        elif summary["steps"] != steps or not summary["last_loss"] < summary["first_loss"]:
            failures.append(f"{name}: {summary['steps']} steps, loss {summary['first_loss']} -> {summary['last_loss']}")
    figures = {f"{row['mode']} last_loss": row["last_loss"] for row in rows}
    if failures:
        raise CheckFailed("; ".join(failures), dict(figures=figures, rows=rows))
    return dict(status="pass", figures=figures, rows=rows)


@dataclass
class Check:
    name: str
    title: str
    budget_s: float  # on the GPU; the budgets add up to at most TOTAL_BUDGET_S
    dry_budget_s: float
    run: Callable[[CheckContext], dict]


CHECKS = [
    Check("cuda_tests", "pytest -m cuda: precisions, compile with FlexAttention, Muon, checkpointing, FSDP2 with async shards",
          150, 60, check_cuda_tests),
    Check("bench", "training step: GPT-2 124M, T=1024, bf16, compiled, largest batch, compile time", 130, 40, check_bench),
    Check("attention", "attention fwd+bwd: SDPA full vs window (FlexAttention, blocked), W=256", 40, 40, check_attention),
    Check("decode", "decoding tokens/s: KV cache vs none (batch 1 and 32) vs transformers (batch 1)", 60, 60, check_decode),
    Check("shakespeare", "real run: config/train_shakespeare_char.py for a fixed time", 45, 40, check_shakespeare),
    Check("distributed", "torchrun --nproc_per_node=1: DDP and FSDP2, bf16", 45, 40, check_distributed),
]


@dataclass
class RunState:
    """What the checks of one run share: the scratch folder, the data (found once) and the measured fixed costs."""
    scratch: str
    data_root: str
    shakespeare_txt: str | None = None
    data: dict | None = None
    fixed_costs: dict = field(default_factory=dict)

    def startup_estimate(self, args):
        """The seconds a command spends starting (Python, imports, CUDA) before its work, from the fixed costs
        measured at the start of the run; None before they are measured."""
        costs = self.fixed_costs
        if "import_torch_s" not in costs:
            return None
        python = costs["python_start_s"]
        with_torch = python + costs["import_torch_s"] + costs["import_repository_s"] + costs.get("cuda_init_s", 0.0)
        command = " ".join(args)
        if "torch.distributed.run" in command:  # the launcher, then the worker
            return round(python + costs["import_torch_s"] + with_torch, 1)
        if "--vs_transformers=True" in command:
            return round(with_torch + costs["import_transformers_s"], 1)
        if any(a in ("bench.py", "train.py", "pytest") for a in args):
            return round(with_torch, 1)
        return round(python, 1)


FIXED_COSTS_PROBE = """
import json, time
marks = dict(start=time.time())
import torch
marks["torch"] = time.time()
import model, train, bench  # noqa: F401
marks["repository"] = time.time()
if torch.cuda.is_available():
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    marks["cuda_init"] = time.time()
import transformers  # noqa: F401
marks["transformers"] = time.time()
print(json.dumps(marks))
"""


def measure_fixed_costs(out, timeout=120):
    """One process that starts Python and imports torch, the repository, CUDA and transformers in turn: what every
    command of the checks pays before its work. Compilation is measured by the bench check (its first step)."""
    launched = time.time()
    try:
        result = subprocess.run([sys.executable, "-c", FIXED_COSTS_PROBE], cwd=REPO, capture_output=True, text=True,
                                timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    except subprocess.TimeoutExpired:
        return dict(error=f"the probe ran out of time ({timeout} s)")
    with open(os.path.join(out, "fixed_costs.log"), "w") as f:
        f.write(result.stdout + result.stderr)
    if result.returncode != 0:
        return dict(error=f"the probe failed (exit {result.returncode}): {result.stderr.strip().splitlines()[-1:]}")
    marks = json.loads(result.stdout.strip().splitlines()[-1])
    costs = dict(python_start_s=marks["start"] - launched, import_torch_s=marks["torch"] - marks["start"],
                 import_repository_s=marks["repository"] - marks["torch"])
    before_transformers = marks["repository"]
    if "cuda_init" in marks:
        costs["cuda_init_s"] = marks["cuda_init"] - marks["repository"]
        before_transformers = marks["cuda_init"]
    costs["import_transformers_s"] = marks["transformers"] - before_transformers
    return {k: round(v, 2) for k, v in costs.items()}


def package_version(*names):
    """The installed version of the first of names that is installed (Triton ships as triton or pytorch-triton)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def nvidia_driver():
    """The NVIDIA driver's version: nvidia-smi, or the kernel module's own line."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=20)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            match = re.search(r"Kernel Module\s+(\S+)", f.read())
            return match.group(1) if match else None
    except OSError:
        return None


def describe_device(dry_run):
    import torch
    from common import device_peak_flops
    info = dict(torch=torch.__version__, python=platform.python_version(), host=platform.node(), cuda_available=torch.cuda.is_available(),
                transformers=package_version("transformers"), triton=package_version("triton", "pytorch-triton"),
                numpy=package_version("numpy"), pytest=package_version("pytest"), pytest_timeout=package_version("pytest-timeout"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda, driver=nvidia_driver(), gpus=torch.cuda.device_count(),
                    peak_bf16_flops=device_peak_flops("cuda:0"))
    else:
        info.update(name=f"CPU ({os.cpu_count()} cores)", cuda=torch.version.cuda, peak_bf16_flops=None)
    if not dry_run and not torch.cuda.is_available():
        raise UserError("no CUDA GPU here: this check is for a GPU; on a CPU run it with --dry_run")
    return info


def run_checks(checks, out, dry_run, run_state, device, report, scale=1.0):
    """Each check in turn under its budget (and the whole run's); a failure is recorded and the next check runs.
    The reports are rewritten after every check."""
    total = (DRY_TOTAL_BUDGET_S if dry_run else TOTAL_BUDGET_S) * scale
    run_deadline = time.monotonic() + total
    report.update(budget_s=total, checks=[])
    for check in checks:
        budget = (check.dry_budget_s if dry_run else check.budget_s) * scale
        deadline = min(time.monotonic() + budget, run_deadline)
        c = CheckContext(check.name, out, deadline, dry_run, run_state, device)
        entry = dict(name=check.name, title=check.title, budget_s=round(budget, 1))
        print(f"== {check.name}: {check.title} (budget {budget:.0f} s)", flush=True)
        start = time.monotonic()
        try:
            entry.update(check.run(c))
        except CheckFailed as e:
            entry.update(status="fail", error=str(e.args[0]), **(e.args[1] if len(e.args) > 1 else {}))
        except Exception as e:  # a bug in a check must not cost the checks after it
            entry.update(status="fail", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        entry.update(seconds=round(time.monotonic() - start, 1), commands=c.commands, notes=c.notes)
        startups = [cmd["startup_s"] for cmd in c.commands if cmd["startup_s"] is not None]
        if startups:  # start-up estimated from the fixed costs; the rest is the work
            entry.update(startup_s=round(sum(startups), 1), work_s=round(max(0.0, entry["seconds"] - sum(startups)), 1))
        report["checks"].append(entry)
        report["total_seconds"] = round(sum(e["seconds"] for e in report["checks"]), 1)
        report["search_cut_short"] = {e["name"]: e["search_cut_short"] for e in report["checks"] if e.get("search_cut_short")}
        if run_state.data is not None:
            report["data"] = run_state.data["source"]
        write_reports(report, out)
        detail = entry.get("error") or entry.get("reason") or ""
        split = f" (start-up ~{entry['startup_s']:.0f} s, work {entry['work_s']:.0f} s)" if "startup_s" in entry else ""
        print(f"   {entry['status']} in {entry['seconds']:.0f} s{split} {detail}".rstrip(), flush=True)
    return report


def format_value(value):
    if isinstance(value, float):  # losses and MFU to 4 decimals, times and rates to 1
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if value is None:
        return "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows):
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(row.get(k)) for k in columns) + " |" for row in rows]
    return lines


VERSION_KEYS = ("torch", "cuda", "driver", "triton", "transformers", "python", "numpy", "pytest", "pytest_timeout")


def write_reports(report, out):
    """report.json (everything) and report.md (the same for people), each written whole then renamed into place."""
    device = report["device"]
    lines = [f"# GPU check{' (dry run)' if report['dry_run'] else ''}", "",
             f"- command: `{report['command']}`", f"- date: {report['date']}",
             f"- device: {device['name']}" + (f", {device['memory_gib']} GiB, compute capability {device['capability']}, "
                                              f"CUDA {device['cuda']}" if device.get("cuda") else "") + f"; torch {device['torch']}",
             "- versions: " + ", ".join(f"{k} {format_value(device.get(k))}" for k in VERSION_KEYS),
             f"- data: {report.get('data', 'not needed by the checks that ran')}",
             "- fixed costs (one process, measured at the start): "
             + (", ".join(f"{k} {v}" for k, v in report.get("fixed_costs", {}).items()) or "-"),
             f"- batch search cut short: {format_value(report.get('search_cut_short') or 'no')}",
             f"- time: {report.get('total_seconds', 0):.0f} s of a {report['budget_s']:.0f} s budget; start-up is estimated "
             "from the fixed costs for each command, work is the rest", "",
             "| check | status | seconds | start-up s | work s | figures |", "|---|---|---:|---:|---:|---|"]
    for e in report["checks"]:
        figures = ", ".join(f"{k} {format_value(v)}" for k, v in (e.get("figures") or {}).items() if k != "anchor")
        lines.append(f"| {e['name']} | {e['status']} | {e['seconds']:.0f} | {format_value(e.get('startup_s'))} "
                     f"| {format_value(e.get('work_s'))} | {figures} |")
    for e in report["checks"]:
        lines += ["", f"## {e['name']}: {e['title']}", "", f"**{e['status']}** in {e['seconds']:.0f} s (budget {e['budget_s']:.0f} s)"]
        if e.get("error"):
            lines += ["", f"error: {format_value(e['error'])}"]
        if e.get("reason"):
            lines += ["", e["reason"]]
        if e.get("figures"):
            lines += [""] + [f"- {k}: {format_value(v)}" for k, v in e["figures"].items()]
        if e.get("rows"):
            lines += [""] + markdown_table(e["rows"])
        for note in e.get("notes", []):
            lines += ["", f"note: {note}"]
        if e.get("commands"):
            lines += ["", "commands:", ""] + [f"- `{cmd['command']}` (exit {cmd['returncode']}, {cmd['seconds']} s, "
                                              f"start-up ~{format_value(cmd.get('startup_s'))} s"
                                              + (", stopped at its time budget" if cmd["stopped_at_budget"] else "")
                                              + (", killed: out of time" if cmd["timed_out"] else "") + f"; log {cmd['log']})"
                                              for cmd in e["commands"]]
    for name, text in (("report.json", json.dumps(report, indent=2, default=str)), ("report.md", "\n".join(lines) + "\n")):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog="see docs/gpu_check.md")
    parser.add_argument("--out", required=True, help="folder for report.json, report.md and every run's logs (nothing else)")
    parser.add_argument("--dry_run", action="store_true", help="every check's code path at tiny sizes on a CPU")
    parser.add_argument("--only", default="", help="comma-separated checks to run: " + ",".join(c.name for c in CHECKS))
    parser.add_argument("--data_root", default=None,
                        help="a folder whose shakespeare_char/ is prepared or holds input.txt (default: the repository's data/)")
    parser.add_argument("--shakespeare_txt", default=None, help="tiny Shakespeare's input.txt, wherever it is")
    parser.add_argument("--budget_scale", type=float, default=1.0, help="multiply every time budget (a slower GPU: 2)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in {c.name for c in CHECKS}]
    if unknown:
        raise UserError(f"--only={args.only!r}: unknown check {unknown[0]!r}; use some of {', '.join(c.name for c in CHECKS)}")
    if not args.budget_scale > 0:
        raise UserError(f"--budget_scale={args.budget_scale} is out of range: use a positive number")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out={args.out!r} is a file; give a folder")
    if args.data_root is not None and not os.path.isdir(args.data_root):
        raise UserError(f"--data_root={args.data_root!r} is not a folder; give the folder that holds shakespeare_char/")
    if args.shakespeare_txt is not None and not os.path.isfile(args.shakespeare_txt):
        raise UserError(f"--shakespeare_txt={args.shakespeare_txt!r} is not a file; give tiny Shakespeare's input.txt")
    device = describe_device(args.dry_run)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(os.path.abspath(sys.argv[0]), REPO), *sys.argv[1:]])
    report = dict(command=command, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  dry_run=args.dry_run, device=device)
    checks = [c for c in CHECKS if not names or c.name in names]
    scratch = tempfile.mkdtemp(prefix="gpu_check_")  # checkpoints and prepared data: never in --out
    try:
        run_state = RunState(scratch, os.path.abspath(args.data_root or os.path.join(REPO, "data")),
                             args.shakespeare_txt and os.path.abspath(args.shakespeare_txt))
        run_state.fixed_costs = report["fixed_costs"] = measure_fixed_costs(out)
        print("fixed costs: " + ", ".join(f"{k} {v}" for k, v in report["fixed_costs"].items()), flush=True)
        run_checks(checks, out, args.dry_run, run_state, device, report, args.budget_scale)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    failed = [e["name"] for e in report["checks"] if e["status"] == "fail"]
    print(f"reports: {os.path.join(out, 'report.md')} and report.json; "
          + (f"failed: {', '.join(failed)}" if failed else "no check failed"))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
