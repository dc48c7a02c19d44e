# tiny Shakespeare characters on a laptop CPU: nanoGPT's CPU model (4 layers, 4 heads, 128 wide, block 64)
# trained to below nanoGPT's CPU result (~1.89 best val loss) in about a quarter of its time (README,
# "A laptop run"; experiments/time_to_quality.py). Runs on whatever device there is.
#  - rotary positions and a 16-token window on every layer: -0.12 and -0.05 val loss at the same steps (README)
#  - Muon for the block matrices, with QK-norm and ReLU² MLPs (experiments/speedrun_variants.py): one Muon step
#    costs more (Newton-Schulz on 16 small matrices), but 250 steps reach what AdamW reached in 700
#  - AdamW (embeddings, norms, biases) at a 4x higher learning rate with a short warmup, beta1 0.8, batch 16
#    instead of 12 (experiments/cpu_batch_sweep.py)
#  - one evaluation at the end instead of one every 250 steps
#  - bf16 matmuls on CPUs that compute bf16 natively (AVX512-BF16 or AMX), attention in fp32 at this length
#    (attention.attends_in_float32); float32 elsewhere, where bf16 is emulated and slower
import torch

out_dir = "out-shakespeare-char-cpu"
eval_interval = 700  # at most max_iters: one evaluation at the end
eval_iters = 20
log_interval = 50

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 16
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
rope = True
window = 16
qk_norm = True
mlp_act = "relu2"

_has_muon = hasattr(torch.optim, "Muon")  # PyTorch >= 2.9; before it, AdamW alone for 700 steps (1.87 in 0.39x)
optimizer = "muon" if _has_muon else "adamw"
muon_lr = 0.02

learning_rate = 4e-3
max_iters = 250 if _has_muon else 700
lr_decay_iters = max_iters
min_lr = 1e-4
beta1 = 0.8  # -0.013 best val loss with AdamW alone (900 steps of batch 12, mean of 3 seeds)
beta2 = 0.99
warmup_iters = 30

_on_cpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
_native_bf16 = any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
dtype = "bfloat16" if _on_cpu and _native_bf16 else "auto"
