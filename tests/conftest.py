"""Fixtures and hooks only (what the tests share otherwise is in helpers.py): the CUDA skip, prepared tiny
data sets, a small disk, and the runs several test files read."""

import os
import sys
import shutil
import subprocess

import numpy as np
import pytest

from helpers import CHAR_MODEL_ARGS, REPO, SHORT_RUN, run_script, script_env, shakespeare_input, tiny_run_args


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda are skipped, with that reason, where there is no CUDA GPU (pyproject.toml's marker)."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="cuda: needs a CUDA GPU; skipped elsewhere")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def short_run(data_root, tmp_path_factory):
    """A 20-step run of CHAR_MODEL_ARGS + SHORT_RUN: test_train.py reads what it wrote, test_sample.py samples from it."""
    out_dir = tmp_path_factory.mktemp("short") / "out"
    run_script(*CHAR_MODEL_ARGS, f"--data_root={data_root}", f"--out_dir={out_dir}", *SHORT_RUN, check=True, timeout=300)
    return out_dir


@pytest.fixture()
def toy_stream(tmp_path):
    """A batch stream over train and val data 0, 1, ..., 999 (the token at position p is p), block_size 8."""
    from dataloader import BatchStream
    folder = tmp_path / "toy"
    folder.mkdir()
    for split in ("train", "val"):
        np.arange(1000, dtype=np.uint16).tofile(folder / f"{split}.bin")
    return BatchStream(str(folder), block_size=8, seed=3, vocab_size=1000)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only; skipped elsewhere), unmounted afterwards."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True, text=True,
                             timeout=60)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield str(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], timeout=30)


@pytest.fixture()
def existing_run(data_root, tmp_path_factory):
    """An out_dir holding a real checkpoint and metrics, to prove a failing command leaves it alone."""
    out = str(tmp_path_factory.mktemp("existing"))
    run_script(*tiny_run_args(data_root, out, "--max_iters=2", "--eval_interval=2"), check=True)
    return out
