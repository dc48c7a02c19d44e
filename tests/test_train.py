"""
train.py: the learning-rate schedule against its formula, one step in-process (the float16 GradScaler step: scale,
unscale before clipping, skipped steps, checkpointed state; activation checkpointing recomputing the blocks),
every setting checked before any work, the stop after too many overflowing float16 steps, end-to-end runs on CPU
(metrics, checkpoints, reproducibility), HellaSwag during training, and one clear line for every mistake a user
can make, with nothing changed on disk.
"""

import os
import sys
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train
import checkpoint
from configurator import read_settings
from runlog import RunLog
import model as model_module
from model import GPT, GPTConfig
from common import UserError
from helpers import (CHAR_MODEL_ARGS, SHORT_RUN, TINY_TRAIN_ARGS, assert_user_error, folder_digest, read_metrics,
                     run_script, sample, split_samples, tiny_run_args, torchrun)
from helpers import EXAMPLES, write_jsonl

STEP_SETTINGS = dict(gradient_accumulation_steps=2, batch_size=3, fsdp=False, seed=7, out_dir="unused", grad_clip=1.0)


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
# one optimizer step, with and without a float16-style GradScaler

def make_run(toy_stream, scaler_enabled, init_scale=2.0**10, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=8, vocab_size=1000, n_layer=1, n_head=2, n_embd=16))
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled, init_scale=init_scale)
    return model, optimizer, scaler


def step(model, optimizer, scaler, toy_stream, index=0, **overrides):
    state = train.TrainState(SimpleNamespace(**dict(STEP_SETTINGS, **overrides)), model, model, model, optimizer, scaler,
                             train.Processes(), train.autocast_context("cpu", "float32"), "cpu")
    return train.train_step(state, toy_stream, index)


def test_grad_scaler_step_unscales_before_clipping_and_updates_like_an_unscaled_step(toy_stream):
    plain = make_run(toy_stream, scaler_enabled=False)
    scaled = make_run(toy_stream, scaler_enabled=True, init_scale=2.0**12)
    loss_a, norm_a, skipped_a = step(*plain, toy_stream)
    loss_b, norm_b, skipped_b = step(*scaled, toy_stream)
    assert not skipped_a and not skipped_b
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    # the norm is of the true gradients: a scaled norm would be 4096 times larger and clip far harder
    assert norm_b == pytest.approx(norm_a, rel=1e-4)
    for (name, a), b in zip(plain[0].named_parameters(), scaled[0].parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert scaled[2].get_scale() == 2.0**12  # no overflow: the scale stays until growth_interval clean steps


def test_grad_scaler_skips_the_step_when_gradients_overflow(toy_stream):
    model, optimizer, scaler = make_run(toy_stream, scaler_enabled=True, init_scale=3e38)  # loss * scale overflows
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, grad_norm, skipped = step(model, optimizer, scaler, toy_stream)
    assert skipped and not math.isfinite(grad_norm)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed on an overflowing step"
    assert scaler.get_scale() == pytest.approx(3e38 * 0.5)  # backed off, so the next step can succeed
    # AdamW did not count the step nor take its gradients into its moments (the fused kernel, used on CUDA
    # and CPUs, gets the overflow flag and undoes its step count; the per-tensor loop is not run at all)
    for state in optimizer.state.values():
        assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_optimizer_and_grad_scaler_state_go_into_the_checkpoint_and_back(toy_stream, tmp_path):
    model, optimizer, scaler = make_run(toy_stream, scaler_enabled=True, init_scale=2.0**5)
    scaler._growth_interval = 1  # grow after every clean step, so the state differs from a fresh scaler
    step(model, optimizer, scaler, toy_stream)
    assert scaler.get_scale() == 2.0**6
    state = SimpleNamespace(settings=SimpleNamespace(out_dir=str(tmp_path)), model=model, optimizer=optimizer, scaler=scaler,
                            checkpoints=checkpoint.FileCheckpoints(str(tmp_path)),
                            processes=train.Processes(), chars=None)
    train.save_run(state, train.RunPosition(step=1, best_val_loss=1.0), evaluated=True)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh_model, fresh_optimizer, fresh_scaler = make_run(toy_stream, scaler_enabled=True, init_scale=1.0)
    fresh_model.load_state_dict(saved["model"])
    checkpoint.restore_training_state(saved, fresh_model, fresh_optimizer, fresh_scaler)
    assert fresh_scaler.get_scale() == 2.0**6
    assert fresh_scaler.state_dict() == scaler.state_dict()
    for p, q in zip(model.parameters(), fresh_model.parameters()):  # AdamW's moments: a resume continues them
        assert optimizer.state[p].keys() == fresh_optimizer.state[q].keys() != set()
        for key, value in optimizer.state[p].items():
            assert torch.equal(fresh_optimizer.state[q][key], value), key


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
def test_grad_checkpoint_recomputes_every_block_in_backward(toy_stream, monkeypatch, checkpointing):
    model, optimizer, scaler = make_run(toy_stream, scaler_enabled=False)
    model.gradient_checkpointing = checkpointing
    calls = count_block_forwards(monkeypatch)
    step(model, optimizer, scaler, toy_stream)
    forwards = STEP_SETTINGS["gradient_accumulation_steps"] * model.config.n_layer
    assert calls["n"] == (2 * forwards if checkpointing else forwards)


def test_grad_checkpoint_gives_the_same_step(toy_stream):
    plain = make_run(toy_stream, scaler_enabled=False)
    recomputed = make_run(toy_stream, scaler_enabled=False)
    recomputed[0].gradient_checkpointing = True
    for run in (plain, recomputed):
        run[0].transformer.drop.p = 0.1  # dropout on: the recomputation must replay the same masks
        for block in run[0].transformer.h:
            block.attn.dropout = 0.1
    assert step(*plain, toy_stream)[:2] == pytest.approx(step(*recomputed, toy_stream)[:2], rel=1e-6)
    for a, b in zip(plain[0].parameters(), recomputed[0].parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_accumulated_micro_batches_step_like_one_batch_of_them_all(toy_stream):
    """gradient_accumulation_steps micro-batches of batch_size rows give the gradient of one batch of all their
    rows (each micro-batch's loss divided by their number): the same loss, gradient norm and weights."""
    accumulated, whole = make_run(toy_stream, scaler_enabled=False), make_run(toy_stream, scaler_enabled=False)
    a = step(*accumulated, toy_stream, gradient_accumulation_steps=2, batch_size=3)
    b = step(*whole, toy_stream, gradient_accumulation_steps=1, batch_size=6)
    assert a[:2] == pytest.approx(b[:2], rel=1e-5)
    for p, q in zip(accumulated[0].parameters(), whole[0].parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0)  # an update is ~lr = 1e-2; float rounding, far less


# -----------------------------------------------------------------------------
# settings checked before any work

def test_settings_out_of_range_are_refused_before_any_work(monkeypatch, tmp_path):
    good = vars(read_settings(dict(vars(train)), []))
    train.validate_settings(SimpleNamespace(**good))
    for key, bad in [("learning_rate", -1.0), ("grad_clip", -1.0), ("max_iters", -5), ("beta2", 1.0),
                     ("min_lr", 1.0), ("weight_decay", -0.1), ("warmup_iters", -1), ("attn_impl", "fast"),
                     ("seed", -1), ("eval_iters", 0), ("lr_decay_iters", 0), ("fsdp_cpu_offload", True),
                     ("async_checkpoint", True)]:
        with pytest.raises(UserError, match=key):
            train.validate_settings(SimpleNamespace(**dict(good, **{key: bad})))
    # and train.main checks them first: a bad one ends it before the data is read, a process group is started
    # or out_dir is made
    work = []

    def reading(data_dir):
        work.append("data read")
        return 65, None
    monkeypatch.setattr(train, "data_vocabulary", reading)
    monkeypatch.setattr(train, "init_process_group", lambda *args: work.append("processes started"))
    monkeypatch.setattr(sys, "argv", ["train.py", f"--out_dir={tmp_path / 'out'}", "--device=cpu", "--learning_rate=-1"])
    with pytest.raises(UserError, match="learning_rate"):
        train.main()
    assert work == [] and not (tmp_path / "out").exists()
    assert vars(read_settings(dict(vars(train)), [])) == good  # main overrides a copy: train's defaults stay


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
def test_a_non_finite_loss_stops_a_run_but_is_a_skipped_step_under_the_grad_scaler(toy_stream, scaler_enabled):
    model, optimizer, scaler = make_run(toy_stream, scaler_enabled=scaler_enabled)
    with torch.no_grad():  # logits overflow to inf: the float16 picture, where 65504 is the largest number
        model.transformer.ln_f.weight.fill_(1e30)
        model.transformer.wte.weight.mul_(1e30)
    if not scaler_enabled:
        with pytest.raises(UserError, match="loss became nan at step 0"):
            step(model, optimizer, scaler, toy_stream)
        return
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, _, skipped = step(model, optimizer, scaler, toy_stream)
    assert skipped and not math.isfinite(loss)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())



# -----------------------------------------------------------------------------
# float16: the stop after MAX_SKIPPED_STEPS overflowing steps in a row

# float16 is refused on a CPU, so the overflow is reported the way a float16 step reports it: the real step
# runs, then says its gradients overflowed (skipped, inf norm) on the steps `overflowing(step)` picks
OVERFLOWING_TRAIN = """
import os, sys
sys.path.insert(0, os.getcwd())
import train, common
real_step = train.train_step
def overflowing(step):
    return {rule}
def train_step(state, batches, step):
    result = real_step(state, batches, step)
    return result._replace(grad_norm=float("inf"), skipped=True) if overflowing(step) else result
train.train_step = train_step
sys.argv = ["train.py", *sys.argv[1:]]
common.run_main(train.main)
"""


def overflowing_run(tmp_path, data_root, rule, *extra):
    script = tmp_path / "overflowing_train.py"
    script.write_text(OVERFLOWING_TRAIN.format(rule=rule))
    out = tmp_path / "out"
    args = [*TINY_TRAIN_ARGS[1:], f"--data_root={data_root}", f"--out_dir={out}", *extra]
    return run_script(str(script), *args, timeout=300), str(out)


def test_stops_after_max_skipped_steps_in_a_row(tmp_path, data_root):
    limit = train.MAX_SKIPPED_STEPS
    result, out = overflowing_run(tmp_path, data_root, "step >= 3", "--max_iters=100", "--eval_interval=1000")
    assert_user_error(result, f"overflowed {limit} steps in a row up to step {3 + limit - 1}", "--learning_rate")
    steps = [r["iter"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(3 + limit - 1))  # the step that made it 20 in a row is not logged


def test_overflows_that_are_not_in_a_row_do_not_stop(tmp_path, data_root):
    limit = train.MAX_SKIPPED_STEPS
    # limit - 1 overflowing steps, one good one, and so on: never `limit` in a row
    result, out = overflowing_run(tmp_path, data_root, f"step % {limit} != {limit - 1}", f"--max_iters={2 * limit + 5}",
                                  "--eval_interval=1000")
    assert result.returncode == 0, result.stderr
    assert [r["iter"] for r in read_metrics(out) if "loss" in r][-1] == 2 * limit + 4



def test_train_refuses_flex_with_dropout(tmp_path, data_root):
    out = tmp_path / "out"
    result = run_script(*TINY_TRAIN_ARGS, f"--data_root={data_root}", f"--out_dir={out}", "--attn_impl=flex", "--window=8",
                        "--dropout=0.1", timeout=300)
    assert_user_error(result, "attn_impl", "dropout")
    assert not out.exists()



# -----------------------------------------------------------------------------
# the done-when test: train a character model on CPU, then sample from it

def train_char(data_root, out_dir, *args, check=True, timeout=300):
    return run_script(*CHAR_MODEL_ARGS, f"--data_root={data_root}", f"--out_dir={out_dir}", *args, check=check, timeout=timeout)


def step_losses(records):
    return [(r["iter"], r["loss"]) for r in records if "loss" in r]


@pytest.mark.slow
def test_train_shakespeare_char_then_sample(data_root, tmp_path):
    out_dir = tmp_path / "out"
    train_char(data_root, out_dir, "--max_iters=500", "--lr_decay_iters=500", "--warmup_iters=20", "--learning_rate=3e-3",
          "--eval_interval=100", "--eval_iters=10", "--log_interval=50")

    evals = [r for r in read_metrics(out_dir) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 100, 200, 300, 400, 500]
    assert abs(evals[0]["val_loss"] - math.log(65)) < 0.3  # an untrained model is near uniform over 65 characters
    assert evals[-1]["val_loss"] < 2.5, evals  # it learned (ln 65 = 4.17)
    assert evals[-1]["val_loss"] < evals[1]["val_loss"]

    checkpoint = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == 500
    assert checkpoint["model_args"]["vocab_size"] == 65 and checkpoint["model_args"]["n_layer"] == 2
    assert checkpoint["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in evals))
    assert "transformer.wte.weight" in checkpoint["model"] and checkpoint["optimizer"]["state"]

    with open(os.path.join(data_root, "shakespeare_char", "meta.json")) as f:
        vocabulary = set(json.load(f)["stoi"])
    result = sample("--init_from=resume", f"--out_dir={out_dir}", "--num_samples=2", "--max_new_tokens=50", "--stream=False")
    samples = split_samples(result.stdout, "\n", 50, 2)  # the default prompt is a newline
    for text in samples:
        assert len(text) == 50 and set(text) <= vocabulary
    assert samples[0] != samples[1]  # sampled, not greedy
    assert "100 tokens" in result.stderr  # 2 x 50 reported



# -----------------------------------------------------------------------------
# a short run (conftest.short_run: CHAR_MODEL_ARGS + SHORT_RUN)

def test_metrics_jsonl(short_run):
    records = read_metrics(short_run)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in steps] == list(range(20))
    assert [r["iter"] for r in evals] == [0, 10, 20]
    for r in steps:
        assert {"iter", "loss", "lr", "tokens_per_sec"} <= set(r)
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 10 and r["tokens_per_sec"] > 0
        # linear warmup: learning_rate 1e-3 over warmup_iters 100
        assert r["lr"] == pytest.approx(1e-3 * (r["iter"] + 1) / 101)
    for r in evals:
        assert {"iter", "train_loss", "val_loss"} <= set(r)
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"])
    # every line is one JSON object (read_metrics parsed them all), each tied to a step
    assert all(isinstance(r.get("iter"), int) for r in records)


def test_checkpoint_loads_with_weights_only(short_run):
    checkpoint = torch.load(short_run / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] in (10, 20)
    assert checkpoint["config"]["max_iters"] == 20 and checkpoint["config"]["dataset"] == "shakespeare_char"
    assert not os.path.exists(short_run / "ckpt.pt.tmp")


def test_reproducible_and_seeded(data_root, short_run, tmp_path):
    expected = step_losses(read_metrics(short_run))
    train_char(data_root, tmp_path / "again", *SHORT_RUN)
    assert step_losses(read_metrics(tmp_path / "again")) == expected  # bit for bit
    train_char(data_root, tmp_path / "seeded", *SHORT_RUN, "--seed=7")
    other = step_losses(read_metrics(tmp_path / "seeded"))
    assert [i for i, _ in other] == [i for i, _ in expected]
    assert all(a != b for (_, a), (_, b) in zip(other, expected))



def test_eval_only_on_a_checkpoint_evaluates_and_changes_no_checkpoint(data_root, existing_run):
    ckpt_before = folder_digest(existing_run)["ckpt.pt"]
    result = run_script(*tiny_run_args(data_root, existing_run, "--init_from=resume", "--eval_only=True"), check=True)
    assert "val loss" in result.stdout
    with open(os.path.join(existing_run, "metrics.jsonl")) as f:
        last = json.loads(f.read().strip().splitlines()[-1])
    assert last["iter"] == 2 and "val_loss" in last
    assert folder_digest(existing_run)["ckpt.pt"] == ckpt_before


def test_the_run_log_appends_across_restarts_and_starts_after_a_torn_record(tmp_path):
    """metrics.jsonl is never truncated: a resumed run appends to it, and a record a crash cut short is left
    on its own line, the next record whole on the line after."""
    log = RunLog(str(tmp_path), active=True)
    log.metrics(dict(iter=0, loss=4.0))
    log.close()
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"iter": 1, "lo')  # a crash mid-write
    log = RunLog(str(tmp_path), active=True)  # the resume
    log.metrics(dict(iter=1, loss=float("nan")))
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[1] == '{"iter": 1, "lo' and [json.loads(lines[i]) for i in (0, 2)] == [{"iter": 0, "loss": 4.0}, {"iter": 1, "loss": None}]


# -----------------------------------------------------------------------------
# HellaSwag inside train.py (--hellaswag_interval): evaluated every K steps and at the end, logged to metrics.jsonl,
# equal to eval_hellaswag.py on the checkpoint, and the same on 1 and 2 processes (examples shared out, counts summed)

# a BPE model (HellaSwag is English text in GPT-2 tokens); bias=False keeps 1 and 2 processes within roundoff
HELLASWAG_ARGS = [*TINY_TRAIN_ARGS, "--dataset=shakespeare", "--bias=False", "--max_iters=4", "--eval_interval=2",
        "--hellaswag_interval=2", "--gradient_accumulation_steps=2"]


def hellaswag_records(out_dir):
    return {r["iter"]: r for r in read_metrics(out_dir) if "hellaswag_acc" in r}


@pytest.fixture(scope="module")
def examples_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("hs") / "hellaswag_val.jsonl", EXAMPLES)


RECORDING_TRAIN = """
import os, sys, json, runpy
sys.path.insert(0, os.getcwd())
import eval_hellaswag
real = eval_hellaswag.evaluate_hellaswag
def recording(*args, **kwargs):
    result = real(*args, **kwargs)
    with open(sys.argv.pop(1), "a") as f:
        f.write(json.dumps(result) + "\\n")
    return result
eval_hellaswag.evaluate_hellaswag = recording
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def hellaswag_run(data_root, examples_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    recorder = out / "recording_train.py"
    recorder.write_text(RECORDING_TRAIN.replace("sys.argv.pop(1)", repr(str(out / "hellaswag_results.jsonl"))))
    run_script(str(recorder), *HELLASWAG_ARGS[1:], f"--data_root={data_root}", f"--out_dir={out}", f"--hellaswag_path={examples_file}",
               check=True)
    return str(out)


def independent_scores(out_dir):
    """Each example scored ending by ending from the run's checkpoint, written here: the model's forward on
    context + " " + ending alone (no batch, no padding), the log-probabilities of the ending's tokens summed."""
    import tiktoken
    import torch
    from common import load_model
    model = load_model("resume", out_dir, overrides=dict(dropout=0.0)).model.eval()
    enc = tiktoken.get_encoding("gpt2")
    scores = []
    for example in EXAMPLES:
        ctx, sums, counts = enc.encode(example["ctx"]), [], []
        for ending in example["endings"]:
            end = enc.encode(" " + ending)
            seq = (ctx + end)[-(model.config.block_size + 1):]
            with torch.no_grad():
                logits, _ = model(torch.tensor([seq[:-1]]))
            logp = torch.log_softmax(logits[0].double(), dim=-1)
            first = len(seq) - len(end)
            sums.append(-sum(logp[first + k - 1, end[k]].item() for k in range(len(end))))
            counts.append(len(end))
        scores.append((sums, counts))
    return scores


def test_hellaswag_every_k_steps_and_at_the_end_equals_the_script(hellaswag_run, examples_file):
    records = hellaswag_records(hellaswag_run)
    assert sorted(records) == [0, 2, 4]
    assert all(r["hellaswag_n"] == len(EXAMPLES) and 0 <= r["hellaswag_acc"] <= 1 for r in records.values())
    with open(os.path.join(hellaswag_run, "hellaswag_results.jsonl")) as f:
        during_training = [json.loads(line) for line in f]
    assert len(during_training) == 3
    final = during_training[-1]  # step 4, the weights of the checkpoint the run ends with
    assert (final["acc"], final["acc_norm"]) == (records[4]["hellaswag_acc"], records[4]["hellaswag_acc_norm"])
    reference = independent_scores(hellaswag_run)
    for i, (sums, counts) in enumerate(reference):
        assert final["n_tokens"][i] == counts
        assert final["sum_loss"][i] == pytest.approx(sums, rel=1e-4, abs=1e-4), i
        assert final["pred"][i] == min(range(4), key=lambda j: sums[j])
        assert final["pred_norm"][i] == min(range(4), key=lambda j: sums[j] / counts[j])
    # the script on the checkpoint: the same per-example scores and choices
    predictions = os.path.join(hellaswag_run, "predictions.jsonl")
    script = run_script("eval_hellaswag.py", "--init_from=resume", "--checkpoint=last", f"--out_dir={hellaswag_run}",
                        f"--data_path={examples_file}",
                        "--device=cpu", f"--predictions_path={predictions}", check=True)
    with open(predictions) as f:
        by_script = [json.loads(line) for line in f]
    for i, p in enumerate(by_script):
        assert (p["pred"], p["pred_norm"]) == (final["pred"][i], final["pred_norm"][i])
        assert p["sum_loss"] == pytest.approx(final["sum_loss"][i], rel=1e-4, abs=1e-4)
    line = script.stdout.strip().splitlines()[-1]
    assert line == f"hellaswag: {len(EXAMPLES)} examples, acc {final['acc']:.4f}, acc_norm {final['acc_norm']:.4f}"


@pytest.mark.slow  # torchrun (~20 s)
def test_two_processes_log_the_same_hellaswag(data_root, examples_file, hellaswag_run, tmp_path):
    out = str(tmp_path / "two")
    result = torchrun(2, *HELLASWAG_ARGS, f"--data_root={data_root}", f"--out_dir={out}", f"--hellaswag_path={examples_file}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert hellaswag_records(out).keys() == hellaswag_records(hellaswag_run).keys()
    for step, record in hellaswag_records(out).items():
        reference = hellaswag_records(hellaswag_run)[step]
        for key in ("hellaswag_n", "hellaswag_acc", "hellaswag_acc_norm"):
            assert record[key] == reference[key], (step, key)


def test_hellaswag_on_a_character_model_is_refused(data_root, examples_file, tmp_path):
    result = run_script(*TINY_TRAIN_ARGS, f"--data_root={data_root}", f"--out_dir={tmp_path / 'out'}",
                        "--hellaswag_interval=2", f"--hellaswag_path={examples_file}")
    assert_user_error(result, "character-level", "hellaswag_interval=0")
    assert not (tmp_path / "out").exists()


def test_hellaswag_without_the_file_is_refused(data_root, tmp_path):
    result = run_script(*HELLASWAG_ARGS, f"--data_root={data_root}", f"--out_dir={tmp_path / 'out'}",
                        f"--hellaswag_path={tmp_path / 'missing.jsonl'}")
    assert_user_error(result, "missing.jsonl", "data/hellaswag/prepare.py")
    assert not (tmp_path / "out").exists()



# -----------------------------------------------------------------------------
# one clear line for every user mistake, and nothing changed

def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_root, tmp_path):
    out = str(tmp_path)
    run_script(*tiny_run_args(data_root, out, "--max_iters=4", "--eval_interval=4"), check=True)
    result = run_script(*tiny_run_args(data_root, out, "--init_from=resume", "--max_iters=200", "--eval_interval=1",
                                    "--learning_rate=1e6", "--grad_clip=0.0", "--decay_lr=False"))
    line = assert_user_error(result, "step")
    assert "nan" in line or "inf" in line
    failed_at = int(line.split(" at step ")[1].split(";")[0])
    checkpoint = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)  # the last one written before it
    assert checkpoint["iter_num"] <= failed_at
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def write_dataset(root, name, tokens, vocab_size=None):
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    for split in ("train", "val"):
        np.array(tokens, dtype=np.uint16).tofile(os.path.join(folder, f"{split}.bin"))
    if vocab_size is not None:
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump(dict(vocab_size=vocab_size, itos={}, stoi={}), f)


BAD_INPUTS = {
    "n_embd not divisible by n_head": (["--n_embd=30", "--n_head=4"], ["n_embd", "n_head"]),
    "n_head not divisible by n_kv_head": (["--n_head=4", "--n_kv_head=3"], ["n_kv_head"]),
    "window below 1": (["--window=0"], ["window"]),
    "odd head dim with rope": (["--n_embd=30", "--n_head=2", "--rope=True"], ["rope", "even"]),
    "unknown key": (["--n_layr=3"], ["n_layr", "n_layer"]),
    "mistyped value": (["--batch_size=four"], ["batch_size", "int"]),
    "missing config file": (["config/no_such_config.py"], ["no_such_config.py", "does not exist"]),
    "resume with no checkpoint": (["--init_from=resume", "--out_dir={tmp}/empty"], ["no checkpoint"]),
    "unknown init_from": (["--init_from=gpt3"], ["init_from"]),
    "eval_interval of zero": (["--eval_interval=0"], ["eval_interval", ">= 1"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_changes_nothing(data_root, existing_run, tmp_path, case):
    extra, needles = BAD_INPUTS[case]
    extra = [e.format(tmp=tmp_path) for e in extra]
    before = folder_digest(existing_run)
    result = run_script(*tiny_run_args(data_root, existing_run, "--max_iters=4"), *extra)
    assert_user_error(result, *needles)
    assert folder_digest(existing_run) == before


def test_config_file_that_fails_to_run(data_root, existing_run, tmp_path):
    bad = tmp_path / "bad_config.py"
    bad.write_text("batch_size = 1 / 0\n")
    before = folder_digest(existing_run)
    assert_user_error(run_script(*tiny_run_args(data_root, existing_run), str(bad)), "bad_config.py", "ZeroDivisionError")
    assert folder_digest(existing_run) == before



@pytest.mark.parametrize("dataset", ["no_such_set", "shakespeare_char"])
def test_missing_dataset_bins(data_root, tmp_path, dataset):
    """A data set never prepared (an unknown name, or the default one under an empty data root): the line names
    the prepare script to run, and no out_dir is made."""
    root = data_root if dataset == "no_such_set" else tmp_path / "empty_root"
    os.makedirs(root, exist_ok=True)
    out = tmp_path / "out"
    result = run_script(*tiny_run_args(root, str(out), f"--dataset={dataset}"))
    assert_user_error(result, f"data/{dataset}/prepare.py")
    assert not out.exists()


def test_dataset_shorter_than_block_size(tmp_path):
    write_dataset(str(tmp_path), "short", list(range(20)), vocab_size=65)
    out = tmp_path / "out"
    result = run_script(*tiny_run_args(str(tmp_path), str(out), "--dataset=short"))  # block_size 32 > 20 tokens
    assert_user_error(result, "block_size")
    assert not out.exists()


def test_token_ids_not_below_vocab_size(tmp_path):
    write_dataset(str(tmp_path), "badids", [1, 2, 3, 70] * 40, vocab_size=65)
    out = tmp_path / "out"
    assert_user_error(run_script(*tiny_run_args(str(tmp_path), str(out), "--dataset=badids")), "70", "vocab_size")
    assert not out.exists()


def test_block_size_larger_than_pretrained(data_root, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    hf_dir = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(hf_dir)
    out = tmp_path / "out"
    result = run_script(*tiny_run_args(data_root, str(out), f"--init_from={hf_dir}", "--dataset=shakespeare", "--block_size=64"))
    assert_user_error(result, "block_size=64", "32")
    assert not out.exists()


def test_out_dir_that_is_a_file(data_root, tmp_path):
    out = tmp_path / "a_file"
    out.write_text("keep me")
    assert_user_error(run_script(*tiny_run_args(data_root, str(out))), "out_dir", "file")
    assert out.read_text() == "keep me"


def test_accumulation_that_does_not_divide_the_world_size(data_root, tmp_path):
    out = tmp_path / "out"
    result = torchrun(2, *tiny_run_args(data_root, str(out), "--gradient_accumulation_steps=3"), timeout=120)
    assert result.returncode != 0
    assert "gradient_accumulation_steps=3" in result.stderr and "multiple of 2" in result.stderr
    assert not out.exists()

