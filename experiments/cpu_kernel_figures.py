"""
The CPU facts behind choices in model.py, measured: bf16 against fp32 attention at short sequences (why
`attends_in_float32` upcasts on a CPU), the blocked window kernel against the dense masked one by T (where
`auto` switches), fused against per-tensor AdamW (why the fused kernel is used on CPUs too), and what
importing torch._dynamo costs at start-up (why the flex block mask is built lazily).

    python experiments/cpu_kernel_figures.py
"""

import os
import sys
import time
import subprocess

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig  # noqa: E402
from attention import blocked_local_attention, dense_attention  # noqa: E402


def ms_per_call(fn, repeats=20):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def sdpa_forward_backward_ms(dtype, T, head_dim=32, heads=4):
    q, k, v = (torch.randn(8, heads, T, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
    return ms_per_call(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward())


def main():
    torch.manual_seed(0)
    fp32, bf16 = sdpa_forward_backward_ms(torch.float32, 64), sdpa_forward_backward_ms(torch.bfloat16, 64)
    print(f"SDPA causal fwd+bwd B=8 H=4 T=64 D=32: fp32 {fp32:.2f} ms, bf16 {bf16:.2f} ms, bf16/fp32 {bf16 / fp32:.2f}x")
    for T in (64, 256, 512, 1024):
        for window in (16, 64):
            q, k, v = (torch.randn(1, 4, T, 32, requires_grad=True) for _ in range(3))
            dense = ms_per_call(lambda: dense_attention(q, k, v, window).sum().backward(), 10)
            blocked = ms_per_call(lambda: blocked_local_attention(q, k, v, window).sum().backward(), 10)
            print(f"window {window} T={T}: dense (masked) {dense:.2f} ms, blocked {blocked:.2f} ms, blocked/dense {blocked / dense:.2f}x")
    model = GPT(GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for fused in (False, True):
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", fused=fused)
        print(f"AdamW step, 4x128 model, fused={fused}: {ms_per_call(optimizer.step, 50):.3f} ms")
    for statement in ("import torch", "import torch, torch._dynamo"):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True, timeout=120)
        print(f"python -c '{statement}': {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
