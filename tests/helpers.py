"""
What two or more test files share: running the repository's scripts, the tiny settings they train with, reading
what a run wrote, the one-line user error, tiny models, torchrun and stop signals. The one home of each; conftest.py
holds only fixtures and hooks. Nothing here imports torch at the top, so the worker scripts can import it cheaply.
"""

import os
import sys
import json
import math
import time
import errno
import threading
import contextlib
import shutil
import socket
import hashlib
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# no network here or in CI: the tokenizer files come from ../shared, and the hub is never asked
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SEPARATOR = "---------------"  # what sample.py prints after each sample
CHILD_TIMEOUT = 240  # seconds a child process (a torchrun launch, a script) may run before the test kills it and fails
STOPPED_EXIT = 75  # train.py's exit status after a stop request: resume me

# a train.py run small enough for a test on 2 CPU cores, every setting explicit so that tuning a config
# file cannot change a test; append --data_root, --out_dir and whatever the test varies (later ones win)
TINY_TRAIN_ARGS = ["train.py", "--dataset=shakespeare_char", "--device=cpu", "--dtype=float32", "--compile=False",
                   "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--dropout=0.0",
                   "--batch_size=4", "--gradient_accumulation_steps=1",
                   "--learning_rate=1e-3", "--min_lr=1e-4", "--beta2=0.99", "--warmup_iters=5",
                   "--max_iters=10", "--lr_decay_iters=10",
                   "--eval_interval=5", "--eval_iters=2", "--log_interval=1"]

# a small character model that still learns quickly on 2 CPU cores
CHAR_MODEL_ARGS = ["train.py", "config/train_shakespeare_char_cpu.py", "--n_layer=2", "--n_head=4", "--n_embd=64",
                   "--batch_size=16", "--device=cpu", "--dtype=float32", "--compile=False"]
SHORT_RUN = ["--max_iters=20", "--eval_interval=10", "--eval_iters=2", "--log_interval=1", "--learning_rate=1e-3",
             "--warmup_iters=100"]


# the architectures the attention and generation tests sweep, with tiny_model's vocabulary
ROPE = [False, True]
KV = [None, 2, 1]
V = 64


# -----------------------------------------------------------------------------
# running the scripts

def env_threads():
    return os.environ.get("OMP_NUM_THREADS", "1")


def script_env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=env_threads())
    env.pop("RANK", None)
    env.update(extra)
    return env


# the scripts whose tests check what they do, not how a process behaves: run in the test's own process, which
# saves starting Python and importing torch (2-4 s a run on 2 cores) hundreds of times per session
IN_PROCESS_SCRIPTS = ("train.py", "sample.py", "export_hf.py", "eval_hellaswag.py", "plot.py", "bench.py")


def run_script(*args, env=None, timeout=600, check=False, in_process=None):
    """Run one of the repository's scripts (train.py, sample.py, ...) from the repository root, as a command
    would: its exit status, stdout and stderr. A script of IN_PROCESS_SCRIPTS runs in this process unless
    in_process=False (a test of signals, exit paths or the interpreter itself needs a real process)."""
    if in_process is None:
        in_process = args[0] in IN_PROCESS_SCRIPTS
    if in_process:
        result = run_in_this_process(*args, env=env)
    else:
        result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                                env=env or script_env(), timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_in_this_process(script, *args, env=None):
    """`python script args...` from the repository root, run in this process, as a subprocess.CompletedProcess.
    A script's main() runs through errors.run_main, as its `__main__` block does; a prepare script's main()
    takes its folder (args[0]). The script sees its own argv, environment (script_env), working directory and
    thread count, and what the run changed (signal handlers, the RNG) is put back after it. A traceback goes
    to the captured stderr with exit status 1, as the interpreter would print it."""
    import io
    import runpy
    import signal
    import traceback
    import torch
    from errors import run_main
    env = env or script_env()
    saved = dict(argv=sys.argv, environ=dict(os.environ), cwd=os.getcwd(), threads=torch.get_num_threads(),
                 signals={s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)},
                 rng=torch.get_rng_state(), dtype=torch.get_default_dtype())
    out, err = io.StringIO(), io.StringIO()
    returncode = 0
    try:
        sys.argv = [script, *args]
        os.environ.clear()
        os.environ.update(env)
        os.chdir(REPO)
        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                namespace = runpy.run_path(os.path.join(REPO, script), run_name="under_test")
                if script.startswith("data/"):
                    namespace["main"](*args)
                else:
                    run_main(namespace["main"])
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    returncode = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    returncode = 1
            except Exception:
                traceback.print_exc()
                returncode = 1
    finally:
        sys.argv = saved["argv"]
        os.environ.clear()
        os.environ.update(saved["environ"])
        os.chdir(saved["cwd"])
        torch.set_num_threads(saved["threads"])
        for signum, handler in saved["signals"].items():
            signal.signal(signum, handler)
        torch.set_rng_state(saved["rng"])
        torch.set_default_dtype(saved["dtype"])
    return subprocess.CompletedProcess([sys.executable, script, *args], returncode, out.getvalue(), err.getvalue())


def sample(*args, check=True, env=None, timeout=300):
    """sample.py on the CPU."""
    return run_script("sample.py", "--device=cpu", *args, check=check, env=env, timeout=timeout)


def split_samples(stdout, prompt, n_new, num_samples):
    """The samples printed with --stream=False: prompt + n_new characters, a newline, the separator line."""
    samples, pos = [], 0
    for _ in range(num_samples):
        text = stdout[pos:pos + len(prompt) + n_new]
        assert text.startswith(prompt), repr(stdout)
        samples.append(text[len(prompt):])
        pos += len(prompt) + n_new
        assert stdout[pos:pos + len(SEPARATOR) + 2] == f"\n{SEPARATOR}\n", repr(stdout)
        pos += len(SEPARATOR) + 2
    assert pos == len(stdout), repr(stdout)
    return samples



def tiny_run_args(data_root, out_dir, *extra):
    """TINY_TRAIN_ARGS on a data root and an out_dir, then `extra` (later ones win)."""
    return [*TINY_TRAIN_ARGS, f"--data_root={data_root}", f"--out_dir={out_dir}", *extra]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, *args, timeout=CHILD_TIMEOUT):
    """`torchrun --standalone --nproc_per_node=nproc` of a script with its arguments, run to the end."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *args], cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=timeout)


def start_run(args, **env):
    """A script started in the background, its stdout and stderr piped."""
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=script_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def watchdog(proc, seconds=CHILD_TIMEOUT):
    """Kills proc if it is still running after `seconds`, so that a hung child fails the test instead of
    hanging the suite (reading its output line by line has no timeout of its own)."""
    expired = []
    timer = threading.Timer(seconds, lambda: (expired.append(True), proc.kill()))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    assert not expired, f"{proc.args} ran longer than {seconds} s and was killed"



def stop_after(proc, prefix, sig, delay=0.0):
    """Send `sig` once the run has printed a line starting with `prefix` (progress, not wall time, decides).
    Returns (stdout after that line, stderr)."""
    for line in proc.stdout:
        if line.startswith(prefix):
            time.sleep(delay)
            proc.send_signal(sig)
            break
    return proc.communicate(timeout=120)


# -----------------------------------------------------------------------------
# what a run wrote

def read_metrics(out_dir):
    """Every record of out_dir/metrics.jsonl, in order (each line must be one JSON object)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out_dir):
    """iter -> training loss; a step logged twice (run again after a restart) must have logged the same loss both times."""
    seen = {}
    for r in read_metrics(out_dir):
        if "loss" in r:
            assert seen.setdefault(r["iter"], r["loss"]) == r["loss"], (r["iter"], seen[r["iter"]], r["loss"])
    return seen


def load_saved(out_dir, name="ckpt.pt"):
    """A one-file checkpoint of a run, read as the scripts read it: weights only."""
    import torch
    return torch.load(os.path.join(out_dir, name), weights_only=True)


def weights(out_dir):
    return load_saved(out_dir)["model"]


def assert_same_weights(a, b):
    import torch
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def folder_digest(*folders):
    """Path -> sha256 of every file under the folders (relative to its folder when there is one folder): to
    prove a command changed nothing there."""
    out = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                key = os.path.relpath(path, folder) if len(folders) == 1 else path
                out[key] = hashlib.sha256(file_bytes(path)).hexdigest()
    return out


def assert_user_error(result, *fragments):
    """A user error as the project reports it: exit 1, no traceback, exactly one line on stderr, holding
    every fragment. Returns that line."""
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# -----------------------------------------------------------------------------
# files that must not be trusted, and a full disk

class RunsCode:
    """Pickled, it runs `touch marker` when loaded: what a checkpoint crafted to run code holds."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def fill(folder, leave):
    """Fill the file system of `folder` until `leave` bytes are free."""
    free = shutil.disk_usage(folder).free - leave
    with open(os.path.join(folder, "filler"), "wb") as f:
        try:
            f.write(b"\0" * max(free, 0))
            f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


# -----------------------------------------------------------------------------
# data and the repository

def shakespeare_input():
    """input.txt of tiny Shakespeare: ../shared's copy, or one already downloaded into data/."""
    import pytest
    for path in (os.path.join(SHARED, "data", "tinyshakespeare", "input.txt"),
                 os.path.join(REPO, "data", "shakespeare_char", "input.txt")):
        if os.path.exists(path):
            return path
    pytest.skip("tiny Shakespeare input.txt is not available offline")


def fresh_copy(dest):
    """The files a clone would have: tracked, or new and not ignored (no data, outputs or caches)."""
    import pytest
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, timeout=60)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell which files a fresh copy has")
    for name in filter(None, listed.stdout.decode().split("\0")):
        if os.path.isfile(os.path.join(REPO, name)):  # listed but deleted in the working tree: not there
            os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
            shutil.copy(os.path.join(REPO, name), os.path.join(dest, name))
    return dest


# -----------------------------------------------------------------------------
# tiny models and references

def tiny_model(seed=0, scale=0.2, **overrides):
    """A tiny GPT (vocabulary 64, block 32, 2 layers, 4 heads, 32 wide; overrides change any GPTConfig
    field) in eval mode, with large random weights: GPT's own init makes attention nearly uniform and
    greedy decoding repeat one token, which would hide a wrong mask or a broken cache. Biases and
    LayerNorm gains are random too."""
    import torch
    from model import GPT, GPTConfig
    config = dict(block_size=32, vocab_size=V, n_layer=2, n_head=4, n_embd=32)
    config.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return model


def logits_of(model, idx):
    """Logits of our GPT or of a transformers model."""
    import torch
    with torch.no_grad():
        out = model(idx)
    return out[0] if isinstance(out, tuple) else out.logits


def naive_attention(q, k, v, window=None):
    """q (B, H, T, D), k/v (B, Hkv, T, D): explicit scores, explicit mask, explicit head repetition."""
    import torch
    B, H, T, D = q.shape
    group = H // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)  # query i sees keys i-window+1 .. i
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ v


def forward_backward(fn, q, k, v, grad):
    """fn's output and the gradients of q, k, v for an upstream gradient `grad`."""
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    (out * grad).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


# a few HellaSwag validation examples, in the real file's format
EXAMPLES = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                 "starts pulling up roofing on a roof."], "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
     "ctx_b": "the lady", "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady",
     "split": "val", "split_type": "zeroshot", "label": 3,
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
                 "stands and lifts the weight over her head."], "source_id": "activitynet~v_-lJS58hyo1c"},
    {"ind": 106, "activity_label": "Canoeing",
     "ctx_a": "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the water, "
              "with other individuals visible in the background.",
     "ctx_b": "the child and a different man",
     "ctx": "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the water, with "
            "other individuals visible in the background. the child and a different man",
     "split": "val", "split_type": "indomain", "label": 2,
     "endings": ["are then shown paddling down a river in a boat while a woman talks.",
                 "are driving the canoe, they go down the river flowing side to side.",
                 "sit in a canoe while the man paddles.",
                 "walking go down the rapids, while the man in his helicopter almost falls and goes out of canoehood."],
     "source_id": "activitynet~v_-xQvJmC2jhk"},
    {"ind": 114, "activity_label": "Making a cake", "ctx_a": "Preheat the oven to 180 °C.", "ctx_b": "",
     "ctx": "Preheat the oven to 180 °C.", "split": "val", "split_type": "zeroshot", "label": 0,
     "endings": ["Mix the flour, sugar and butter in a bowl – gently.", "Put the cake in the freezer for a week.",
                 "Pour the café crème on the naïve dog.", "Paint the oven blue."], "source_id": "wikihow~1"},
    {"ind": 200, "activity_label": "Long context", "ctx_a": "", "ctx_b": "",
     "ctx": "This context is much longer than the tiny model's thirty-two positions, so the evaluation has to keep only "
            "its last tokens: the ending must always be kept whole, and the context is cut from the start. Then",
     "split": "val", "split_type": "indomain", "label": 1,
     "endings": ["it ends.", "the story goes on for a while and then it finally ends here.", "no.",
                 "everything is fine and the reader can stop reading now, thank you."], "source_id": "test~long"},
    {"ind": 300, "activity_label": "Short", "ctx_a": "The cat", "ctx_b": "", "ctx": "The cat", "split": "val",
     "split_type": "indomain", "label": 2, "endings": ["sat.", "ran.", "sat on the mat.", "slept."], "source_id": "test~short"},
    {"ind": 301, "activity_label": "Seven", "ctx_a": "Finally,", "ctx_b": "", "ctx": "Finally,", "split": "val",
     "split_type": "zeroshot", "label": 1, "endings": ["yes", "no", "maybe", "the end of the examples"], "source_id": "test~7"},
]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)
