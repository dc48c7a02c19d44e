"""
Attention: how the model's queries see its keys. `attend` is the one place that chooses how attention is
computed, from the config and the call: the precision (the fp32 rule, attends_in_float32), the kernel
(causal_attention's pick among ATTENTION_IMPLS) and the decoding path through a KV cache. Below it are the
kernels, the rotary position embedding they apply to queries and keys, and the mask rule they share.

All kernels take q (B, H, T, D) and k, v (B, Hkv, S, D), with H a multiple of Hkv: query head h uses
key/value head h // (H // Hkv), SDPA's enable_gqa convention.
"""

import torch
from torch.nn import functional as F

from errors import ConfigError

ATTENTION_IMPLS = ("auto", "dense", "blocked", "flex")  # how windowed layers attend; 'auto' picks by device and shape
QK_NORM_EPS = 1e-6  # added to the mean square of each query/key head before the reciprocal square root
# CPU attention under low precision runs in fp32 below this many query positions times head dimension
# (attends_in_float32); longer sequences are faster in bf16
FLOAT32_ATTENTION_MAX_SIZE = 32768


# -----------------------------------------------------------------------------
# The one place that chooses how attention is computed

def attend(qkv: torch.Tensor, config, layer_idx: int, rope=None, kv_cache=None, impl: str = "auto",
           dropout_p: float = 0.0) -> torch.Tensor:
    """
    Causal self-attention of one layer: qkv (B, T, (H + 2 Hkv) * D), the output of c_attn laid out
    [q | k | v], to (B, T, H * D) in qkv's dtype. rope: (cos, sin) tables (T, 1, D/2) or None. Three roads:
    - no cache (training, evaluation): the T tokens see each other through causal_attention's kernel pick;
    - a KV cache that is empty (the prefill): the same, after the cache has stored k and v;
    - a KV cache that holds earlier tokens (decoding): the new tokens attend to everything the cache holds.
    The fp32 rule (attends_in_float32) is decided once, before the rotary embedding. Without a cache all of
    qkv is cast, so the rotation runs in fp32 too; a prefill rotates in qkv's dtype, because the keys it
    caches are the ones decoding reads back, and casts q, k, v for the kernel only. Decoding attends in the
    cache's dtype: the rule was measured on whole sequences, not on one query row.
    """
    B, T, _ = qkv.shape
    window = config.layer_window(layer_idx)
    decoding = kv_cache is not None and kv_cache.pos > 0
    in_float32 = not decoding and attends_in_float32(qkv, T, config.head_dim)
    compute_dtype = qkv.dtype
    if in_float32 and kv_cache is None:
        qkv = qkv.float()  # one cast for q, k and v, and the rotation
    q, k, v = split_heads(qkv, config, rope)  # (B, H or Hkv, T, D)
    if kv_cache is not None:
        k_all, v_all = kv_cache.update(layer_idx, k, v)
    if decoding:
        y = attention_after_cache(q, k_all, v_all, window)
    else:  # a prefill attends over the new k, v: a rolling buffer may already have dropped some of them
        y = causal_attention(q, k, v, window, impl, dropout_p, in_float32)
    return y.to(compute_dtype).transpose(1, 2).contiguous().view(B, T, -1)


def split_heads(qkv, config, rope=None):
    """q (B, H, T, D) and k, v (B, Hkv, T, D) from qkv (B, T, (H + 2 Hkv) * D), the queries and keys
    RMS-normalised per head (config.qk_norm) and rotated (rope)."""
    B, T, _ = qkv.shape
    H, Hkv, D = config.n_head, config.n_kv_head, config.head_dim
    heads = qkv.view(B, T, H + 2 * Hkv, D)
    qk, v = heads.split([H + Hkv, Hkv], dim=2)
    if config.qk_norm:  # before the rotation, though a rotation keeps the norm: the order does not matter
        qk = F.rms_norm(qk, (D,), eps=QK_NORM_EPS)
    if rope is not None:
        qk = apply_rope(qk, *rope)  # q and k in one pass, against tables (T, 1, D)
    q, k = qk.split([H, Hkv], dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def attention_after_cache(q, k_all, v_all, window):
    """New tokens q (B, H, T, D) that follow cached ones attend to k_all, v_all: every position the layer's
    cache holds, theirs included (KVCache.update)."""
    gqa = q.shape[1] != k_all.shape[1]
    T = q.shape[2]
    if T == 1:  # one new token sees everything the cache holds (the rolling buffer is its window)
        return F.scaled_dot_product_attention(q, k_all, v_all, enable_gqa=gqa)
    # several new tokens after cached ones (global layers, or windows not yet full: slots in position order)
    S = k_all.shape[2]
    key_pos = torch.arange(S, device=q.device)
    mask = causal_window_mask(key_pos[S - T:, None], key_pos[None, :], window)
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=gqa)


# -----------------------------------------------------------------------------
# Kernels

def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None, impl: str = "auto",
                     dropout_p: float = 0.0, in_float32: bool | None = None) -> torch.Tensor:
    """
    The T tokens of q, k, v attending to each other, causally, through the kernel pick_kernel picks (impl: one
    of ATTENTION_IMPLS). in_float32: the kernel runs on fp32 copies, autocast off, and the result comes back
    in q's dtype; None decides it by attends_in_float32, for callers other than attend (bench.py, tests).
    """
    if in_float32 is None:
        in_float32 = attends_in_float32(q, q.shape[-2], q.shape[-1])
    if not in_float32:
        return run_kernel(q, k, v, window, impl, dropout_p)
    with torch.autocast("cpu", enabled=False):
        return run_kernel(q.float(), k.float(), v.float(), window, impl, dropout_p).to(q.dtype)


def run_kernel(q, k, v, window, impl, dropout_p):
    kernel = pick_kernel(q.shape[-2], window, impl, q.device.type, dropout_p)
    if kernel == "flex":
        return flex_window_attention(q, k, v, window)
    if kernel == "blocked":
        return blocked_local_attention(q, k, v, window, dropout_p=dropout_p)
    return dense_attention(q, k, v, window, dropout_p)


def pick_kernel(T: int, window: int | None, impl: str, device_type: str, dropout_p: float) -> str:
    """
    The kernel of causal_attention: 'dense', 'blocked' or 'flex'. Full causal attention is always dense SDPA.
    'auto' uses dense SDPA unless a window is much shorter than a long sequence, where the blocked
    kernel's linear cost wins; on CUDA under torch.compile it uses FlexAttention's block-sparse kernel
    (without compile FlexAttention runs an unfused reference path, slower than the blocked kernel).
    """
    if window is None or window >= T or impl == "dense":
        return "dense"
    if impl == "auto":
        if device_type == "cuda" and dropout_p == 0.0 and torch.compiler.is_compiling():
            return "flex"
        # the blocked kernel's padded bands cost more than they save on short sequences; from T=512 on
        # they save more (measured with bench.py --mode=attention on a CPU, windows 16 and 64)
        return "blocked" if T >= max(4 * window, 512) else "dense"
    if impl == "flex" and dropout_p > 0.0:
        raise ConfigError("the flex attention kernel has no dropout; use attn_impl='blocked' or dropout=0")
    return impl


def causal_window_mask(q_pos, k_pos, window=None):
    """The attention rule in one place: query position i sees key position j when i - window < j <= i
    (causal, and within the window when there is one). Positions are tensors that broadcast against
    each other (a mask), or the index tensors of a FlexAttention mask_mod."""
    seen = k_pos <= q_pos
    if window is not None:
        seen = seen & (k_pos > q_pos - window)
    return seen


def dense_attention(q, k, v, window=None, dropout_p=0.0):
    """Causal attention over all T x T scores; a window is applied as a mask (quadratic cost)."""
    T = q.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if window is None or window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=gqa)
    positions = torch.arange(T, device=q.device)
    mask = causal_window_mask(positions[:, None], positions[None, :], window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


def blocked_local_attention(q, k, v, window, block=None, dropout_p=0.0):
    """
    Sliding-window causal attention in O(T * window) time and memory, on any device.
    Queries are cut into blocks of `block` positions; each block attends to the window-1 keys before
    it plus its own, a band of block + window - 1 keys, so no T x T matrix is ever formed.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    block = block or max(window, 64)
    n_blocks = -(-T // block)
    span = block + window - 1
    pad_right = n_blocks * block - T
    # queries: (B, H, n_blocks, block, D)
    qb = F.pad(q, (0, 0, 0, pad_right)).view(B, H, n_blocks, block, D)
    # keys/values padded with window-1 positions on the left, then overlapping bands of `span`
    def bands(x):
        x = F.pad(x, (0, 0, window - 1, pad_right))
        return x.unfold(2, span, block).transpose(-1, -2)  # (B, Hkv, n_blocks, span, D)
    kb, vb = bands(k), bands(v)
    # query i of block b sits at b*block + i; band key j at b*block - (window-1) + j; keys before 0 are padding
    block_start = torch.arange(n_blocks, device=q.device)[:, None, None] * block
    query_pos = block_start + torch.arange(block, device=q.device)[:, None]
    key_pos = block_start - (window - 1) + torch.arange(span, device=q.device)[None, :]
    mask = causal_window_mask(query_pos, key_pos, window) & (key_pos >= 0)  # (n_blocks, block, span)
    # fold the blocks into the batch so SDPA sees heads at dim -3 (needed for enable_gqa)
    qb = qb.permute(0, 2, 1, 3, 4).reshape(B * n_blocks, H, block, D)
    kb = kb.permute(0, 2, 1, 3, 4).reshape(B * n_blocks, Hkv, span, D)
    vb = vb.permute(0, 2, 1, 3, 4).reshape(B * n_blocks, Hkv, span, D)
    mask = mask.unsqueeze(1).repeat(B, 1, 1, 1)  # (B * n_blocks, 1, block, span)
    y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p, enable_gqa=H != Hkv)
    y = y.view(B, n_blocks, H, block, D).permute(0, 2, 1, 3, 4).reshape(B, H, n_blocks * block, D)
    return y[:, :, :T]


_flex_block_masks = {}


def sliding_window_block_mask(T, window, device):
    """FlexAttention's block mask of a sliding window, built once per (T, window, device) outside any
    compiled graph, then reused. torch.compiler.disable is applied here on first use, not as a decorator:
    that would import torch._dynamo with this file, which every script would wait for at start-up."""
    key = (T, window, str(device))
    if key not in _flex_block_masks:
        _flex_block_masks[key] = torch.compiler.disable(_create_sliding_window_block_mask)(T, window, device)
    return _flex_block_masks[key]


def _create_sliding_window_block_mask(T, window, device):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding_window_causal(b, h, q_idx, kv_idx):
        return causal_window_mask(q_idx, kv_idx, window)
    return create_block_mask(sliding_window_causal, None, None, T, T, device=device)


def flex_window_attention(q, k, v, window):
    """FlexAttention with a block-sparse sliding-window mask: skips the blocks outside the band (fast on CUDA under compile)."""
    from torch.nn.attention.flex_attention import flex_attention
    block_mask = sliding_window_block_mask(q.shape[-2], window, q.device)
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def attends_in_float32(x, T, head_dim):
    """
    PyTorch's CPU attention kernels are slower in bf16 than in fp32 for short sequences, which made bf16
    autocast training no faster than fp32 on a CPU (measured with bench.py --mode=attention on a CPU).
    Attention on the CPU under low precision (x, the queries or the qkv projection, in bf16/fp16, or
    CPU autocast on) runs in fp32 there, exact for bf16 inputs; long sequences are faster in bf16.
    """
    low_precision = x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")
    return x.device.type == "cpu" and low_precision and T * head_dim < FLOAT32_ATTENTION_MAX_SIZE


# -----------------------------------------------------------------------------
# Rotary position embedding.
# Pairing convention: "split halves", as in GPT-NeoX and HF's Llama (rotate_half): within each head,
# dimension i is rotated together with dimension i + head_dim/2, by angle position * theta^(-2i/head_dim).

def rope_cos_sin(positions, head_dim, theta, dtype=torch.float32):
    """cos and sin of the rotation angles, each (len(positions), head_dim/2): row p, column i holds the
    angle p * theta^(-2i/head_dim) of the pair (i, i + head_dim/2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotates each pair (x1, x2) = (x[..., i], x[..., i + head_dim/2]) by its angle. x is (..., head_dim);
    cos, sin from rope_cos_sin broadcast against either half: (T, head_dim/2) for x (B, n_heads, T, head_dim),
    (T, 1, head_dim/2) for x (B, T, n_heads, head_dim)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under autocast on a GPU q, k are bf16: keep them so, like v
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
