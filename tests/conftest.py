"""Shared test set-up: offline tokenizer and hub, the repository on sys.path, and prepared tiny data sets."""

import os
import sys
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
                       stdout=subprocess.DEVNULL, env=script_env())
    return str(root)


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
