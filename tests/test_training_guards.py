"""
Guards of training that had no test: CPU bf16 autocast (attention upcast to fp32) against fp32, forward
and backward; the stop after MAX_SKIPPED_STEPS overflowing float16 steps in a row; the refusal of the flex
kernel with dropout.
"""

import torch

import pytest

import attention
from conftest import TINY_TRAIN_ARGS, assert_user_error, read_metrics, run_script, tiny_model
from model import ConfigError


# -----------------------------------------------------------------------------
# CPU bf16 training

def loss_and_grads(model, idx, targets, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, loss = model(idx, targets)
    loss.backward()
    return loss.item(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("overrides", [dict(), dict(rope=True, n_kv_head=2, window=8)], ids=["gpt2", "rope-gqa-window"])
def test_cpu_bf16_autocast_training_matches_fp32(overrides):
    """A training forward and backward under CPU bf16 autocast (what the quick start runs on CPUs with native
    bf16) agree with fp32 to bf16's precision, for the loss and every parameter's gradient."""
    model = tiny_model(seed=3, scale=0.05, **overrides).train()
    g = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 64, (4, 32), generator=g), torch.randint(0, 64, (4, 32), generator=g)
    loss32, grads32 = loss_and_grads(model, idx, targets, autocast=False)
    loss16, grads16 = loss_and_grads(model, idx, targets, autocast=True)
    assert abs(loss16 - loss32) <= 2e-2 * abs(loss32), (loss16, loss32)
    for name, g32 in grads32.items():
        g16 = grads16[name].float()
        assert torch.isfinite(g16).all(), name
        relative = ((g16 - g32).norm() / g32.norm().clamp_min(1e-12)).item()
        assert relative < 5e-2, (name, relative)
    # and bf16 did run: the results are not fp32's bit for bit
    assert loss16 != loss32 or any(not torch.equal(grads16[n], grads32[n]) for n in grads32)


def test_cpu_attention_under_bf16_runs_in_fp32():
    """Under CPU autocast at a short length, attention of bf16 queries, keys and values is computed in fp32
    (exact for bf16 inputs) and rounded once: the fp32 result of the same inputs, not bf16 SDPA's."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=g).to(torch.bfloat16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention.causal_attention(q, k, v, window=16)
    assert out.dtype == torch.bfloat16
    expected = attention.causal_attention(q.float(), k.float(), v.float(), window=16).to(torch.bfloat16)
    assert torch.equal(out, expected)
    with torch.autocast("cpu", enabled=False):  # bf16 SDPA differs: the comparison above can fail
        in_bf16 = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(64, 64, dtype=torch.bool).tril()
                                                                   & ~torch.ones(64, 64, dtype=torch.bool).tril(-16))
    assert not torch.equal(in_bf16, expected)


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
    import train
    limit = train.MAX_SKIPPED_STEPS
    result, out = overflowing_run(tmp_path, data_root, "step >= 3", "--max_iters=100", "--eval_interval=1000")
    assert_user_error(result, f"overflowed {limit} steps in a row up to step {3 + limit - 1}", "--learning_rate")
    steps = [r["iter"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(3 + limit - 1))  # the step that made it 20 in a row is not logged


def test_overflows_that_are_not_in_a_row_do_not_stop(tmp_path, data_root):
    import train
    limit = train.MAX_SKIPPED_STEPS
    # limit - 1 overflowing steps, one good one, and so on: never `limit` in a row
    result, out = overflowing_run(tmp_path, data_root, f"step % {limit} != {limit - 1}", f"--max_iters={2 * limit + 5}",
                                  "--eval_interval=1000")
    assert result.returncode == 0, result.stderr
    assert [r["iter"] for r in read_metrics(out) if "loss" in r][-1] == 2 * limit + 4


# -----------------------------------------------------------------------------
# the flex kernel and dropout

def test_flex_kernel_refuses_dropout():
    q = k = v = torch.randn(1, 2, 16, 8)
    with pytest.raises(ConfigError, match="dropout"):
        attention.causal_attention(q, k, v, window=4, impl="flex", dropout_p=0.1)
    model = tiny_model(window=4, dropout=0.1).train()
    model.set_attention_impl("flex")
    with pytest.raises(ConfigError, match="dropout"):
        model(torch.randint(0, 64, (1, 16)))


def test_train_refuses_flex_with_dropout(tmp_path, data_root):
    out = tmp_path / "out"
    result = run_script(*TINY_TRAIN_ARGS, f"--data_root={data_root}", f"--out_dir={out}", "--attn_impl=flex", "--window=8",
                        "--dropout=0.1", timeout=300)
    assert_user_error(result, "attn_impl", "dropout")
    assert not out.exists()
