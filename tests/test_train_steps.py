"""
train.py's steps in-process: the learning-rate schedule against its formula, the batch stream, the dropout
seeds, the float16 GradScaler step (scale, unscale before clipping, skipped steps, checkpointed state), and
activation checkpointing actually recomputing the blocks.
"""

import os
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train
import checkpoint
from configurator import read_settings
import model as model_module
from model import GPT, GPTConfig
from common import UserError
from conftest import TINY_TRAIN_ARGS, read_metrics, run_script

SETTINGS = dict(gradient_accumulation_steps=2, batch_size=3, fsdp=False, seed=7, out_dir="unused", grad_clip=1.0)


def reference_lr(step, lr=1e-3, warmup=10, decay=100, min_lr=1e-4):
    """The schedule as the README states it, written out independently."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step > decay:
        return min_lr
    progress = (step - warmup) / (decay - warmup)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize("step", [0, 5, 9, 10, 11, 30, 55, 99, 100, 101, 500])
def test_learning_rate_schedule_matches_the_formula(step):
    assert train.lr_at(step, 1e-3, 10, 100, 1e-4) == pytest.approx(reference_lr(step), rel=1e-12)


def test_learning_rate_schedule_shape():
    lrs = [train.lr_at(s, 1e-3, 10, 100, 1e-4) for s in range(120)]
    assert lrs[9] < lrs[10] == pytest.approx(1e-3)  # warmup ends at the peak
    assert lrs[55] == pytest.approx((1e-3 + 1e-4) / 2)  # halfway through the cosine: the midpoint
    assert all(a >= b for a, b in zip(lrs[10:101], lrs[11:101]))  # monotone decay
    assert lrs[100] == pytest.approx(1e-4) and lrs[119] == 1e-4  # min_lr at and after lr_decay_iters
    assert train.lr_at(50, 1e-3, 10, 100, 1e-4, decay_lr=False) == 1e-3


# -----------------------------------------------------------------------------
# the batch stream

@pytest.fixture()
def stream(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    for split in ("train", "val"):
        np.arange(1000, dtype=np.uint16).tofile(folder / f"{split}.bin")
    return train.BatchStream(str(folder), block_size=8, seed=3, vocab_size=1000)


def test_batch_stream_rows_are_shifted_windows_at_reproducible_offsets(stream):
    offsets = stream.offsets(0, 5, 4, "train")
    assert np.array_equal(offsets, stream.offsets(0, 5, 4, "train"))  # a pure function of (seed, stream, index)
    assert not np.array_equal(offsets, stream.offsets(0, 6, 4, "train"))
    x, y = stream.rows("train", offsets)
    assert x.shape == (4, 8) and x.dtype == torch.int64
    for row, o in enumerate(offsets):  # the toy data's token at position p is p
        assert x[row].tolist() == list(range(o, o + 8)) and y[row].tolist() == list(range(o + 1, o + 9))


def test_batch_stream_check_finds_what_does_not_fit(stream, tmp_path):
    stream.check()
    small_vocab = train.BatchStream(stream.data_dir, 8, 3, vocab_size=500)
    with pytest.raises(UserError, match="token id 999"):
        small_vocab.check()
    with pytest.raises(UserError, match="fewer than block_size"):
        train.BatchStream(stream.data_dir, 2000, 3, 1000).check()
    with pytest.raises(UserError, match="no train data"):
        train.BatchStream(str(tmp_path / "nothing"), 8, 3, 1000).check()


def test_dropout_seeds_depend_on_seed_step_and_micro_batch_only():
    seeds = {(s, k, j): train.dropout_seed(s, k, j) for s in (1, 2) for k in range(4) for j in range(4)}
    assert len(set(seeds.values())) == len(seeds)
    assert train.dropout_seed(1, 2, 3) == seeds[(1, 2, 3)]
    assert 0 <= seeds[(1, 2, 3)] < 2**63


# -----------------------------------------------------------------------------
# one optimizer step, with and without a float16-style GradScaler

def make_run(stream, scaler_enabled, init_scale=2.0**10, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=8, vocab_size=1000, n_layer=1, n_head=2, n_embd=16))
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled, init_scale=init_scale)
    return model, optimizer, scaler


def step(model, optimizer, scaler, stream, index=0, **overrides):
    state = train.TrainState(SimpleNamespace(**dict(SETTINGS, **overrides)), model, model, model, optimizer, scaler,
                             train.Processes(), train.autocast_context("cpu", "float32"), "cpu")
    return train.train_step(state, stream, index)


def test_grad_scaler_step_unscales_before_clipping_and_updates_like_an_unscaled_step(stream):
    plain = make_run(stream, scaler_enabled=False)
    scaled = make_run(stream, scaler_enabled=True, init_scale=2.0**12)
    loss_a, norm_a, skipped_a = step(*plain, stream)
    loss_b, norm_b, skipped_b = step(*scaled, stream)
    assert not skipped_a and not skipped_b
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    # the norm is of the true gradients: a scaled norm would be 4096 times larger and clip far harder
    assert norm_b == pytest.approx(norm_a, rel=1e-4)
    for (name, a), b in zip(plain[0].named_parameters(), scaled[0].parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert scaled[2].get_scale() == 2.0**12  # no overflow: the scale stays until growth_interval clean steps


def test_grad_scaler_skips_the_step_when_gradients_overflow(stream):
    model, optimizer, scaler = make_run(stream, scaler_enabled=True, init_scale=3e38)  # loss * scale overflows
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, grad_norm, skipped = step(model, optimizer, scaler, stream)
    assert skipped and not math.isfinite(grad_norm)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed on an overflowing step"
    assert scaler.get_scale() == pytest.approx(3e38 * 0.5)  # backed off, so the next step can succeed
    # AdamW did not count the step nor take its gradients into its moments (the fused kernel, used on CUDA
    # and CPUs, gets the overflow flag and undoes its step count; the per-tensor loop is not run at all)
    for state in optimizer.state.values():
        assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_grad_scaler_state_goes_into_the_checkpoint_and_back(stream, tmp_path):
    model, optimizer, scaler = make_run(stream, scaler_enabled=True, init_scale=2.0**5)
    scaler._growth_interval = 1  # grow after every clean step, so the state differs from a fresh scaler
    step(model, optimizer, scaler, stream)
    assert scaler.get_scale() == 2.0**6
    state = SimpleNamespace(settings=SimpleNamespace(out_dir=str(tmp_path)), model=model, optimizer=optimizer, scaler=scaler,
                            checkpoints=checkpoint.FileCheckpoints(str(tmp_path)),
                            processes=train.Processes(), chars=None)
    train.save_run(state, train.RunPosition(step=1, best_val_loss=1.0), evaluated=True)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh_model, fresh_optimizer, fresh_scaler = make_run(stream, scaler_enabled=True, init_scale=1.0)
    fresh_model.load_state_dict(saved["model"])
    checkpoint.restore_training_state(saved, fresh_model, fresh_optimizer, fresh_scaler)
    assert fresh_scaler.get_scale() == 2.0**6
    assert fresh_scaler.state_dict() == scaler.state_dict()


# -----------------------------------------------------------------------------
# activation checkpointing recomputes

def count_block_forwards(monkeypatch):
    calls = {"n": 0}
    original = model_module.Block.forward

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)
    monkeypatch.setattr(model_module.Block, "forward", counting)
    return calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_grad_checkpoint_recomputes_every_block_in_backward(stream, monkeypatch, checkpointing):
    model, optimizer, scaler = make_run(stream, scaler_enabled=False)
    model.gradient_checkpointing = checkpointing
    calls = count_block_forwards(monkeypatch)
    step(model, optimizer, scaler, stream)
    forwards = SETTINGS["gradient_accumulation_steps"] * model.config.n_layer
    assert calls["n"] == (2 * forwards if checkpointing else forwards)


def test_grad_checkpoint_gives_the_same_step(stream):
    plain = make_run(stream, scaler_enabled=False)
    recomputed = make_run(stream, scaler_enabled=False)
    recomputed[0].gradient_checkpointing = True
    for run in (plain, recomputed):
        run[0].transformer.drop.p = 0.1  # dropout on: the recomputation must replay the same masks
        for block in run[0].transformer.h:
            block.attn.dropout = 0.1
    assert step(*plain, stream)[:2] == pytest.approx(step(*recomputed, stream)[:2], rel=1e-6)
    for a, b in zip(plain[0].parameters(), recomputed[0].parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_settings_out_of_range_are_refused_before_any_work():
    good = vars(read_settings(dict(vars(train)), []))
    train.validate_settings(SimpleNamespace(**good))
    for key, bad in [("learning_rate", -1.0), ("grad_clip", -1.0), ("max_iters", -5), ("beta2", 1.0),
                     ("min_lr", 1.0), ("weight_decay", -0.1), ("warmup_iters", -1), ("attn_impl", "fast"),
                     ("seed", -1), ("eval_iters", 0), ("lr_decay_iters", 0), ("fsdp_cpu_offload", True),
                     ("async_checkpoint", True)]:
        with pytest.raises(UserError, match=key):
            train.validate_settings(SimpleNamespace(**dict(good, **{key: bad})))
    assert os.environ.get("RANK") is None


def test_schedule_rules_apply_only_with_decay(tmp_path):
    """min_lr, warmup_iters and lr_decay_iters shape the decay only: with decay_lr=False a min_lr above
    learning_rate (config/finetune_shakespeare.py keeps the default 6e-5 beside 3e-5) is no mistake."""
    good = vars(read_settings(dict(vars(train)), []))
    for key, value in [("min_lr", 1.0), ("warmup_iters", -1), ("lr_decay_iters", 0)]:
        with pytest.raises(UserError, match=key):
            train.validate_settings(SimpleNamespace(**dict(good, **{key: value})))
        train.validate_settings(SimpleNamespace(**dict(good, decay_lr=False, **{key: value})))
    finetune = read_settings(dict(vars(train)), [os.path.join(os.path.dirname(train.__file__), "config",
                                                              "finetune_shakespeare.py"), f"--out_dir={tmp_path / 'out'}"])
    assert finetune.min_lr > finetune.learning_rate and not finetune.decay_lr
    train.validate_settings(finetune)


def test_a_run_without_decay_trains_at_learning_rate_whatever_min_lr(data_root, tmp_path):
    out = tmp_path / "out"
    run_script(*TINY_TRAIN_ARGS, f"--data_root={data_root}", f"--out_dir={out}", "--decay_lr=False", "--learning_rate=1e-3",
               "--min_lr=1e-2", "--max_iters=3", check=True, timeout=300)
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert [r["iter"] for r in steps] == [0, 1, 2] and all(r["lr"] == 1e-3 for r in steps)


@pytest.mark.parametrize("scaler_enabled", [False, True])
def test_a_non_finite_loss_stops_a_run_but_is_a_skipped_step_under_the_grad_scaler(stream, scaler_enabled):
    model, optimizer, scaler = make_run(stream, scaler_enabled=scaler_enabled)
    with torch.no_grad():  # logits overflow to inf: the float16 picture, where 65504 is the largest number
        model.transformer.ln_f.weight.fill_(1e30)
        model.transformer.wte.weight.mul_(1e30)
    if not scaler_enabled:
        with pytest.raises(UserError, match="loss became nan at step 0"):
            step(model, optimizer, scaler, stream)
        return
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, _, skipped = step(model, optimizer, scaler, stream)
    assert skipped and not math.isfinite(loss)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
