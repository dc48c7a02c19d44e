"""Shared test set-up: offline tokenizer and hub, the repository on sys.path, and prepared tiny data sets."""

import os
import sys
import json
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
sys.path.insert(0, REPO)

# no network here or in CI: the tokenizer files come from ../shared, and the hub is never asked
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda are skipped, with that reason, where there is no CUDA GPU (pyproject.toml's marker)."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="cuda: needs a CUDA GPU; skipped elsewhere")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def shakespeare_input():
    """input.txt of tiny Shakespeare: ../shared's copy, or one already downloaded into data/."""
    for path in (os.path.join(SHARED, "data", "tinyshakespeare", "input.txt"),
                 os.path.join(REPO, "data", "shakespeare_char", "input.txt")):
        if os.path.exists(path):
            return path
    pytest.skip("tiny Shakespeare input.txt is not available offline")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A data root with shakespeare_char and shakespeare prepared by their own prepare.py scripts."""
    root = tmp_path_factory.mktemp("data")
    for name in ("shakespeare_char", "shakespeare"):
        folder = root / name
        folder.mkdir()
        shutil.copy(shakespeare_input(), folder / "input.txt")
        shutil.copy(os.path.join(REPO, "data", name, "prepare.py"), folder / "prepare.py")
        subprocess.run([sys.executable, str(folder / "prepare.py")], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL, env=script_env(), timeout=300)
    return str(root)


def fresh_copy(dest):
    """The files a clone would have: tracked, or new and not ignored (no data, outputs or caches)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, timeout=60)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell which files a fresh copy has")
    for name in filter(None, listed.stdout.decode().split("\0")):
        if os.path.isfile(os.path.join(REPO, name)):  # listed but deleted in the working tree: not there
            os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
            shutil.copy(os.path.join(REPO, name), os.path.join(dest, name))
    return dest


def script_env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=env_threads())
    env.pop("RANK", None)
    env.update(extra)
    return env


def env_threads():
    return os.environ.get("OMP_NUM_THREADS", "1")


def run_script(*args, env=None, timeout=600, check=False):
    """Run one of the repository's scripts (train.py, sample.py, ...) from the repository root."""
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                            env=env or script_env(), timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


# -----------------------------------------------------------------------------
# helpers shared by the test files

# a train.py run small enough for a test on 2 CPU cores, every setting explicit so that tuning a config
# file cannot change a test; append --data_root, --out_dir and whatever the test varies (later ones win)
TINY_TRAIN_ARGS = ["train.py", "--dataset=shakespeare_char", "--device=cpu", "--dtype=float32", "--compile=False",
                   "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--dropout=0.0",
                   "--batch_size=4", "--gradient_accumulation_steps=1",
                   "--learning_rate=1e-3", "--min_lr=1e-4", "--beta2=0.99", "--warmup_iters=5",
                   "--max_iters=10", "--lr_decay_iters=10",
                   "--eval_interval=5", "--eval_iters=2", "--log_interval=1"]


def read_metrics(out_dir):
    """Every record of out_dir/metrics.jsonl, in order (each line must be one JSON object)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


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


def tiny_model(seed=0, scale=0.2, **overrides):
    """A tiny GPT (vocabulary 64, block 32, 2 layers, 4 heads, 32 wide; overrides change any GPTConfig
    field) in eval mode, with large random weights: GPT's own init makes attention nearly uniform and
    greedy decoding repeat one token, which would hide a wrong mask or a broken cache. Biases and
    LayerNorm gains are random too."""
    import torch
    from model import GPT, GPTConfig
    config = dict(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
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
