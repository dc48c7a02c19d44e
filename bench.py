"""
Measures, never asserts. Three modes, all on synthetic data:

    python bench.py                         # training steps: tokens/s, ms/iter, MFU, peak memory
    python bench.py --mode=attention        # attention fwd+bwd time and memory against T: full vs windowed
    python bench.py --mode=generate         # generation tokens/s with and without the KV cache

Model and run settings are --key=value as in train.py (configurator.py). Warm-up steps are timed
separately and left out. Peak memory is the CUDA allocator's peak on GPU, and the process's peak
resident set (VmHWM, reset before each measurement) on Linux CPUs.
"""

import sys
import json
import time

import torch

from model import GPT, GPTConfig, KVCache, causal_attention
from configurator import apply_overrides
from common import UserError, run_main, pick_device, pick_dtype, autocast_context, estimate_mfu

# -----------------------------------------------------------------------------
mode = "train"  # 'train' | 'attention' | 'generate'
# model
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = 50304
block_size = 1024
bias = True
rope = False
n_kv_head = None
window = None
attn_impl = "auto"
# train mode
batch_size = 8
seq_len = 0  # 0: block_size
warmup_steps = 3
steps = 10
grad_checkpoint = False
# attention mode: one layer's attention, GPT-2 small's heads
seq_lens = (1024, 2048, 4096, 8192, 16384)
bench_window = 256
impls = ("full", "window-dense", "window-blocked")
attn_repeats = 3
dense_max_T = 16384  # skip the masked dense window (quadratic time) past this length
# generate mode
prompt_len = 16
new_tokens = 512
use_cache = True
beyond_block_size = False
memory_at = ()  # generate mode: also report peak memory after these many tokens, e.g. (1024, 2048, 4096, 8192)
# system
device = "auto"
dtype = "auto"
compile = False
seed = 1337
json_out = ""  # also append the results as one JSON line to this file
# -----------------------------------------------------------------------------


def reset_peak_memory(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux: resets the peak resident set size (VmHWM)
        except OSError:
            pass


def peak_memory_mib(dev):
    if dev.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def build_model(dev):
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size, block_size=block_size,
                       bias=bias, rope=rope, n_kv_head=n_kv_head, window=window)
    model = GPT(config).to(dev)
    model.set_attention_impl(attn_impl)
    return model


def kv_bytes_per_token(config, element_size):
    """Bytes of keys and values one position adds to the cache (windowed layers stop adding past their window)."""
    return 2 * config.n_layer * config.n_kv_head * config.head_dim * element_size


def bench_train(dev, ptdtype):
    model = build_model(dev)
    model.gradient_checkpointing = grad_checkpoint
    T = seq_len or block_size
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), dev.split(":")[0])
    run = torch.compile(model) if compile else model
    ctx = autocast_context(dev, ptdtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_size, (batch_size, T), generator=g).to(dev)
    y = torch.randint(0, vocab_size, (batch_size, T), generator=g).to(dev)

    def step():
        with ctx:
            _, loss = run(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup_steps):  # compilation, allocator and cache warm-up
        step()
    sync(dev)
    reset_peak_memory(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    dt = (time.perf_counter() - t0) / steps
    tokens_per_sec = batch_size * T / dt
    mfu = estimate_mfu(model, T, tokens_per_sec, dev)
    return dict(params=model.get_num_params(), flops_per_token=model.flops_per_token(T), ms_per_iter=dt * 1000,
                tokens_per_sec=tokens_per_sec, mfu=mfu, peak_mem_mib=peak_memory_mib(dev),
                kv_bytes_per_token=kv_bytes_per_token(model.config, torch.finfo(getattr(torch, ptdtype)).bits // 8))


def bench_attention(dev, ptdtype):
    """One layer's attention, forward + backward, GPT-2 small heads (n_head x 64), batch 1."""
    head_dim = n_embd // n_head
    kv_heads = n_kv_head or n_head
    rows = []
    for T in seq_lens:
        for impl in impls:
            if impl == "window-dense" and T > dense_max_T:
                print(f"T={T:6d} {impl:15s} skipped (longer than --dense_max_T={dense_max_T})", flush=True)
                continue
            g = torch.Generator().manual_seed(seed)
            dt_ = getattr(torch, ptdtype)
            q = torch.randn(1, n_head, T, head_dim, generator=g).to(dev, dt_).requires_grad_()
            k = torch.randn(1, kv_heads, T, head_dim, generator=g).to(dev, dt_).requires_grad_()
            v = torch.randn(1, kv_heads, T, head_dim, generator=g).to(dev, dt_).requires_grad_()
            w, kernel = {"full": (None, "dense"), "window-dense": (bench_window, "dense"),
                         "window-blocked": (bench_window, "blocked"), "window-flex": (bench_window, "flex")}[impl]

            def run_once():
                y = causal_attention(q, k, v, w, kernel)
                y.sum().backward()
                q.grad = k.grad = v.grad = None

            run_once()  # warm-up
            sync(dev)
            reset_peak_memory(dev)
            t0 = time.perf_counter()
            for _ in range(attn_repeats):
                run_once()
            sync(dev)
            ms = (time.perf_counter() - t0) / attn_repeats * 1000
            rows.append(dict(T=T, impl=impl, window=w, ms_fwd_bwd=ms, peak_mem_mib=peak_memory_mib(dev)))
            print(f"T={T:6d} {impl:15s} {ms:10.1f} ms  peak {rows[-1]['peak_mem_mib'] or 0:9.1f} MiB", flush=True)
            del q, k, v
    return rows


@torch.no_grad()
def bench_generate(dev, ptdtype):
    model = build_model(dev).eval()
    ctx = autocast_context(dev, ptdtype)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (1, prompt_len), generator=g).to(dev)
    result = dict(params=model.get_num_params(), use_cache=use_cache, new_tokens=new_tokens)
    with ctx:
        list(model.generate_stream(prompt, 4, temperature=0, use_cache=use_cache))  # warm-up
        sync(dev)
        reset_peak_memory(dev)
        marks = sorted(memory_at)
        memory = {}
        t0 = time.perf_counter()
        for i, _ in enumerate(model.generate_stream(prompt, new_tokens, temperature=0, use_cache=use_cache,
                                                    beyond_block_size=beyond_block_size), start=1):
            if marks and i == marks[0]:
                memory[i] = peak_memory_mib(dev)
                marks.pop(0)
        sync(dev)
        dt = time.perf_counter() - t0
    result.update(tokens_per_sec=new_tokens / dt, seconds=dt, peak_mem_mib=peak_memory_mib(dev))
    if memory:
        result["peak_mem_mib_at"] = memory
    if use_cache:
        # sized as generate_stream sizes it: every position, capped at block_size unless rope runs past it
        positions = prompt_len + new_tokens
        if not (rope and beyond_block_size):
            positions = min(positions, block_size)
        cache = KVCache(model.config, 1, positions, "meta", getattr(torch, ptdtype))
        result["kv_cache_bytes"] = cache.nbytes()
    return result


def main():
    settings = apply_overrides(globals(), sys.argv[1:])
    if mode not in ("train", "attention", "generate"):
        raise UserError(f"unknown mode {mode!r}; use train, attention or generate")
    dev = pick_device(device)
    ptdtype = pick_dtype(dtype, dev)
    torch.manual_seed(seed)
    try:
        result = {"train": bench_train, "attention": bench_attention, "generate": bench_generate}[mode](dev, ptdtype)
    except ValueError as e:
        raise UserError(str(e)) from None
    device_name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else f"{dev} ({torch.get_num_threads()} threads)"
    record = dict(mode=mode, device=device_name, dtype=ptdtype, settings=settings, result=result)
    if mode != "attention":
        for key, value in result.items():
            print(f"{key:>20}: {value:,.4g}" if isinstance(value, float) else f"{key:>20}: {value}")
    if json_out:
        with open(json_out, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    run_main(main)
