"""
The GPU paths, each against a reference that does not take it: bf16 and float16 (GradScaler) training
against float32, a compiled rope + window model's training (FlexAttention inside the graph on CUDA) against
eager, FlexAttention's window against a dense attention with an explicit mask, Muon on CUDA against Muon on
the CPU, gradient checkpointing against keeping the activations, the bf16 KV cache against the uncached
forward, the fused AdamW against the per-tensor loop, and FSDP2 with bf16 mixed precision and asynchronous
sharded checkpoints against one float32 process. The GPU variants are marked cuda
(skipped where there is no CUDA GPU; `pytest -m cuda` runs them, as experiments/gpu_check.py does). Where
the same body means something on a CPU it runs there too, so the code is exercised in every run of the suite.
"""

import os
import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train
import attention
from model import GPT, GPTConfig, Block
from checkpoint import load_checkpoint
from optimizers import muon_available
from helpers import TINY_TRAIN_ARGS, V, forward_backward, naive_attention, read_metrics, run_script, tiny_model, torchrun

CUDA = pytest.param("cuda", marks=pytest.mark.cuda)
DEVICES = ["cpu", CUDA]


@pytest.fixture()
def toy_data_root(tmp_path):
    """A character data set 'toy' of 64 symbols, each followed by the next (mod 64): a tiny model learns it within
    a few steps, and nothing is downloaded or prepared (a GPU machine may have neither network nor tiny Shakespeare)."""
    folder = tmp_path / "toy"
    folder.mkdir()
    for split in ("train", "val"):
        (np.arange(5000) % V).astype(np.uint16).tofile(folder / f"{split}.bin")
    (folder / "meta.json").write_text(json.dumps(dict(vocab_size=V, itos={str(i): chr(33 + i) for i in range(V)})))
    return tmp_path


@pytest.fixture()
def stream(toy_data_root):
    return train.BatchStream(str(toy_data_root / "toy"), block_size=16, seed=3, vocab_size=V)


MUON = dict(lr=0.02, momentum=0.95, ns_steps=5, weight_decay=0.0)  # train.py's defaults


def train_run(stream, device, dtype, steps=5, compile=False, init_scale=2.0**16, muon=None, **config):
    """steps optimizer steps of train.py's train_step (2 micro-steps of 4 rows) on a fresh tiny model (config overrides
    GPTConfig fields), from the same initial weights whatever the device and precision. Returns (losses, grad norms,
    skipped steps, model, scaler). bias=False: a key bias has a gradient that is zero in exact arithmetic, and AdamW
    blows its roundoff up."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**dict(dict(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=32, bias=False), **config))).to(device)
    optimizer = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), device, muon=muon)
    scaler = torch.amp.GradScaler(device, enabled=dtype == "float16", init_scale=init_scale)
    run = torch.compile(model) if compile else model
    settings = SimpleNamespace(gradient_accumulation_steps=2, batch_size=4, fsdp=False, seed=7, out_dir="unused", grad_clip=1.0)
    state = train.TrainState(settings, model, model, run, optimizer, scaler, train.Processes(),
                             train.autocast_context(device, dtype), device)
    losses, norms, skipped = [], [], []
    for step in range(steps):
        loss, norm, skip = train.train_step(state, stream, step)
        losses.append(loss), norms.append(norm), skipped.append(skip)
    return losses, norms, skipped, model, scaler


def assert_runs_in(model, device, dtype):
    """Under the run's autocast the logits really are in that precision: the low-precision path was taken."""
    with torch.no_grad(), train.autocast_context(device, dtype):
        logits, _ = model(torch.zeros(1, 4, dtype=torch.long, device=device))
    assert logits.dtype == getattr(torch, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_training_losses_close_to_fp32(stream, device):
    fp32, norms32, _, _, _ = train_run(stream, device, "float32")
    bf16, norms16, skipped, model, _ = train_run(stream, device, "bfloat16")
    assert_runs_in(model, device, "bfloat16")
    differences = [abs(a - b) for a, b in zip(fp32, bf16)]
    assert max(differences) < 0.05, (fp32, bf16)  # ln(64) = 4.16 at the start: ~1%
    assert max(differences) > 0, "bf16 losses equal fp32's to the last bit: autocast did nothing"
    assert bf16[-1] < bf16[0] - 0.1  # and it trains
    assert norms16 == pytest.approx(norms32, rel=0.05) and not any(skipped)


@pytest.mark.cuda
def test_float16_with_grad_scaler_close_to_fp32(stream):
    fp32, norms32, _, _, _ = train_run(stream, "cuda", "float32")
    fp16, norms16, skipped, model, scaler = train_run(stream, "cuda", "float16", init_scale=2.0**10)
    assert_runs_in(model, "cuda", "float16")
    assert scaler.is_enabled() and not any(skipped) and scaler.get_scale() == 2.0**10
    assert max(abs(a - b) for a, b in zip(fp32, fp16)) < 0.03, (fp32, fp16)
    # the norms are of the unscaled gradients: without unscale_ before clipping they would be 1024 times larger
    assert norms16 == pytest.approx(norms32, rel=0.05)
    assert fp16[-1] < fp16[0] - 0.1


ROPE_WINDOW = dict(rope=True, window=8)  # T=16: the window matters, and under compile on CUDA auto picks FlexAttention


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), CUDA])
def test_compiled_rope_window_training_equals_eager(stream, device, monkeypatch):
    """torch.compile over train.py's step on a rope + window model. On CUDA attn_impl='auto' runs FlexAttention's
    block-sparse kernel inside the compiled graph (it picks it only while compiling) and dense SDPA in eager: two
    kernels, equal within float32 rounding (TF32 in FlexAttention's kernel). On the CPU both run the dense kernel."""
    traced = []
    original = attention.flex_window_attention

    def recording_flex(q, k, v, window):
        traced.append(torch.compiler.is_compiling())
        return original(q, k, v, window)

    eager, eager_norms, _, eager_model, _ = train_run(stream, device, "float32", steps=3, **ROPE_WINDOW)
    monkeypatch.setattr(attention, "flex_window_attention", recording_flex)
    compiled, compiled_norms, _, compiled_model, _ = train_run(stream, device, "float32", steps=3, compile=True, **ROPE_WINDOW)
    torch.compiler.reset()
    if device == "cuda":
        assert traced and all(traced), "FlexAttention did not run inside the compiled graph"
        loss_tolerance, norm_tolerance = 2e-3, 1e-2
    else:
        assert not traced
        loss_tolerance, norm_tolerance = 1e-4, 1e-3
        for (name, a), b in zip(eager_model.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0, msg=lambda m: f"{name}: {m}")
    assert compiled == pytest.approx(eager, abs=loss_tolerance)
    assert compiled_norms == pytest.approx(eager_norms, rel=norm_tolerance)
    assert compiled[-1] < compiled[0]


@pytest.mark.cuda
@pytest.mark.skipif(not muon_available(), reason="torch.optim.Muon needs PyTorch >= 2.9")
def test_muon_on_cuda_trains_like_muon_on_the_cpu(stream):
    """Muon for the block matrices and AdamW for the rest (configure_optimizers' split), bf16 autocast: the same
    steps on CUDA as on the CPU within bf16 rounding (the Newton-Schulz iteration runs in bf16 on both)."""
    cpu, cpu_norms, _, _, _ = train_run(stream, "cpu", "bfloat16", muon=MUON)
    cuda, cuda_norms, skipped, model, _ = train_run(stream, "cuda", "bfloat16", muon=MUON)
    assert_runs_in(model, "cuda", "bfloat16")
    assert max(abs(a - b) for a, b in zip(cpu, cuda)) < 0.05, (cpu, cuda)
    assert cuda_norms == pytest.approx(cpu_norms, rel=0.1) and not any(skipped)
    assert cuda[-1] < cuda[0] - 0.1
    adamw_only, _, _, _, _ = train_run(stream, "cuda", "bfloat16")
    assert max(abs(a - b) for a, b in zip(adamw_only[1:], cuda[1:])) > 1e-3, "the same losses as AdamW alone: Muon did not step"


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_checkpointing_gives_the_same_gradients(device, monkeypatch):
    """model.gradient_checkpointing (train.py --grad_checkpoint=True): each block's forward runs again in backward,
    and the loss and gradients equal those of a forward that kept its activations."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=32, **ROPE_WINDOW)).to(device).train()
    idx = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(1)).to(device)
    forwards = [0]
    original = Block.forward

    def counting_forward(self, *args, **kwargs):
        forwards[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Block, "forward", counting_forward)
    results = {}
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        forwards[0] = 0
        _, loss = model(idx, idx)
        loss.backward()
        results[checkpointing] = (loss.item(), forwards[0], {n: p.grad.clone() for n, p in model.named_parameters()})
    (plain_loss, plain_forwards, plain_grads), (loss, forwards_again, grads) = results[False], results[True]
    assert plain_forwards == 2 and forwards_again == 4  # 2 blocks; with checkpointing each runs again in backward
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.cuda
@pytest.mark.parametrize("compiled, dtype, T, window", [
    (False, torch.float32, 256, 32),
    (True, torch.float32, 300, 64),  # T not a multiple of FlexAttention's 128-block, GQA, the compiled kernel
    (True, torch.bfloat16, 300, 64),  # what training runs: compiled, bf16
])
def test_flex_window_forward_and_backward_match_dense_reference(compiled, dtype, T, window):
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, heads, T, 64, generator=g) for heads in (4, 2, 2, 4))
    flex = torch.compile(attention.flex_window_attention) if compiled else attention.flex_window_attention
    ours = forward_backward(lambda a, b, c: flex(a, b, c, window), *(t.to("cuda", dtype) for t in (q, k, v, grad)))
    reference = forward_backward(lambda a, b, c: naive_attention(a, b, c, window), q, k, v, grad)  # CPU, float32
    # float32 within TF32 rounding, bf16 within its own: a window one key off is 0.09 away at T=300, W=64
    tolerance = 2e-3 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, reference):
        assert relative_error(a.cpu(), b) < tolerance, name
    # the window matters at these sizes: full causal attention is far from the reference
    full = naive_attention(q, k, v)
    assert relative_error(full, reference[0]) > 0.1


# tiny models whose greedy choices (16 after a 6-token prompt drawn with the same seed) lead the runner-up by
# >= 0.158 in float32 while bf16 moves the logits by ~0.03 (measured on a CPU), with >= 6 different tokens:
# GPT-2's architecture, and rope + GQA + a window of 4 (a rolling cache)
KV_MODELS = [dict(seed=156), dict(seed=6, rope=True, n_kv_head=2, window=4)]
PROMPT, NEW = 6, 16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_model", KV_MODELS, ids=["gpt2", "rope-gqa-window"])
def test_bf16_cached_generation_equals_uncached_token_for_token(device, kv_model):
    model = tiny_model(**kv_model).to(device)
    prompt = torch.randint(0, V, (1, PROMPT), generator=torch.Generator().manual_seed(kv_model["seed"])).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        uncached = model.generate(prompt, NEW, temperature=0, use_cache=False)
        cached = model.generate(prompt, NEW, temperature=0, use_cache=True)
        with torch.no_grad():
            logits = model(uncached[:, :-1])[0][:, PROMPT - 1:].float()  # the bf16 logits that chose each new token
    top = logits.topk(2).values
    margin = (top[..., 0] - top[..., 1]).min().item()
    assert margin > 0.05, f"a near tie in bf16 (margin {margin:.3f}): the comparison below would be luck; pick another seed"
    assert torch.equal(cached, uncached), (cached, uncached)
    assert len(set(cached[0, PROMPT:].tolist())) >= 5  # varied: a repeated token would hide a broken cache


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_matches_the_per_tensor_loop(device):
    """configure_optimizers picks the fused kernel on CUDA (and CPUs); its steps equal the plain loop's,
    with weight decay on matrices and embeddings only (written out here independently)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=32)).to(device)
    reference = copy.deepcopy(model)
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), device)
    assert optimizer.defaults["fused"] is True
    groups = [{"params": [p for p in reference.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    plain = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=False, fused=False)
    g = torch.Generator().manual_seed(1)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        for p, r in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, generator=g).to(device)
            r.grad = p.grad.clone()
        optimizer.step()
        plain.step()
    for (name, p), r, p0 in zip(model.named_parameters(), reference.parameters(), start):
        torch.testing.assert_close(p, r, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
        assert not torch.equal(p, p0), f"{name} did not move"


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), CUDA])
def test_fsdp2_bf16_mixed_precision_trains_like_one_fp32_process(toy_data_root, tmp_path, device):
    """torchrun --nproc_per_node=1 train.py --fsdp=True --dtype=bfloat16 --async_checkpoint=True (NCCL on a GPU,
    gloo on a CPU): bf16 compute through FSDP2's mixed-precision policy, float32 master weights, losses near one
    float32 process, the checkpoints written in shards in the background and read back."""
    args = [*TINY_TRAIN_ARGS, f"--device={device}", "--bias=False", "--max_iters=8", "--eval_interval=8",
            "--gradient_accumulation_steps=2", "--dataset=toy", f"--data_root={toy_data_root}"]
    single, fsdp = str(tmp_path / "single"), str(tmp_path / "fsdp")
    run_script(*args, "--dtype=float32", f"--out_dir={single}", timeout=300, check=True)
    result = torchrun(1, *args, "--dtype=bfloat16", "--fsdp=True", "--async_checkpoint=True", f"--out_dir={fsdp}", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FSDP on 1 x" in result.stdout and "bfloat16" in result.stdout
    assert "checkpoints: sharded, each process writing its own part in the background" in result.stdout
    assert os.path.isdir(os.path.join(fsdp, "ckpt.dcp"))
    reference = {r["iter"]: r["loss"] for r in read_metrics(single) if "loss" in r}
    ours = {r["iter"]: r["loss"] for r in read_metrics(fsdp) if "loss" in r}
    assert ours.keys() == reference.keys() and len(ours) == 8
    differences = [abs(ours[i] - reference[i]) for i in ours]
    assert max(differences) < 0.05, (reference, ours)
    assert max(differences) > 1e-4, "the losses of float32 (up to roundoff): no bf16 compute"
    weights = load_checkpoint(os.path.join(fsdp, "ckpt.pt"))["model"]
    assert all(t.dtype == torch.float32 for t in weights.values())  # the master weights stay float32
