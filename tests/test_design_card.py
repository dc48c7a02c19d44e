"""The design card's four commands, in the order a user types them, on a fresh copy of the repository
(with small overrides where the full run takes hours):

    python data/shakespeare/prepare.py
    python train.py config/train_rope.py
    torchrun --standalone --nproc_per_node=2 train.py --fsdp=True
    python sample.py --init_from=gpt2            (offline here: one clear line)
"""

import os
import sys
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import assert_user_error, fresh_copy, read_metrics, script_env, shakespeare_input

pytestmark = pytest.mark.slow  # four processes, one of them a 2-process torchrun: about a minute on 2 cores


def run(repo, *args, env=None, timeout=600):
    return subprocess.run(list(args), cwd=repo, capture_output=True, text=True, env=env or script_env(), timeout=timeout)


def ok(result):
    assert result.returncode == 0, f"{result.args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def test_design_card_commands_in_order(tmp_path):
    repo = fresh_copy(str(tmp_path / "repo"))
    for leftover in ("out", "out-rope"):
        assert not os.path.exists(os.path.join(repo, leftover))
    shutil.copy(shakespeare_input(), os.path.join(repo, "data", "shakespeare", "input.txt"))  # no download

    # 1. GPT-2 BPE tokens of tiny Shakespeare
    ok(run(repo, sys.executable, "data/shakespeare/prepare.py"))
    for split in ("train", "val"):
        assert len(np.fromfile(os.path.join(repo, "data", "shakespeare", f"{split}.bin"), dtype=np.uint16)) > 1000

    # 2. the rope variant trains on the data just prepared (its config as is, then a short run)
    ok(run(repo, sys.executable, "train.py", "config/train_rope.py", "--max_iters=4", "--eval_interval=2",
           "--eval_iters=1", "--log_interval=1", "--warmup_iters=1", "--batch_size=2", "--device=cpu"))
    out = os.path.join(repo, "out-rope")
    evals = [r for r in read_metrics(out) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 2, 4]
    checkpoint = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert checkpoint["model_args"]["rope"] is True and checkpoint["model_args"]["vocab_size"] >= 50257
    assert checkpoint["config"]["dataset"] == "shakespeare"

    # 3. FSDP on two processes, on the defaults but for a small model on the prepared data
    ok(run(repo, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--fsdp=True", "--dataset=shakespeare", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
           "--batch_size=2", "--gradient_accumulation_steps=2", "--max_iters=2", "--eval_interval=2",
           "--eval_iters=2", "--warmup_iters=1", "--device=cpu", timeout=300))
    records = read_metrics(os.path.join(repo, "out"))
    assert any(r.get("world_size") == 2 for r in records)
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 2]
    assert os.path.isfile(os.path.join(repo, "out", "ckpt.pt"))

    # 4. GPT-2 from the hub, on a machine that never downloaded it and has no network
    env = script_env(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = run(repo, sys.executable, "sample.py", "--init_from=gpt2", env=env, timeout=300)
    assert_user_error(result, "gpt2")
    assert result.stdout == ""
