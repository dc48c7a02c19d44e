"""
GPT-2 written from scratch, in one file, with three optional architectural changes:

- rope:      rotary position embedding on queries and keys instead of the learned position table
- n_kv_head: grouped-query attention (n_kv_head=1 is multi-query, n_kv_head=n_head is plain MHA)
- window:    causal sliding-window attention, for all layers or chosen per layer

and two from the recent speedruns (modded-nanogpt, nanochat):

- qk_norm:   queries and keys RMS-normalised per head (no learned scale) before the rotary embedding
- mlp_act:   the MLP's activation, GELU (GPT-2's tanh approximation) or ReLU² (relu(x)**2)

With all three off this is exactly GPT-2, with GPT-2's parameter names, so OpenAI's checkpoints
load one to one (GPT.from_pretrained). Generation uses a key/value cache (KVCache) whose windowed
layers keep a rolling buffer of the last `window` positions.

References:
1) OpenAI's GPT-2 TensorFlow code: https://github.com/openai/gpt-2/blob/master/src/model.py
2) RoFormer (rotary embeddings): https://arxiv.org/abs/2104.09864
3) GQA: https://arxiv.org/abs/2305.13245 ; Longformer / Mistral sliding windows: https://arxiv.org/abs/2004.05150
4) QK-norm: https://arxiv.org/abs/2302.05442 ; ReLU²: https://arxiv.org/abs/2109.08668 (Primer)
"""

import math
import inspect
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, asdict

import torch
import torch.nn as nn
from torch.nn import functional as F


class ConfigError(ValueError):
    """A setting, shape or checkpoint that does not fit the model: the caller's input, not a bug in this file.
    Scripts turn it into one line for the user; any other exception keeps its traceback."""


GPT2_VOCAB_SIZE = 50257  # GPT-2's BPE: 50,000 merges, 256 bytes and <|endoftext|>
MLP_ACTIVATIONS = ("gelu", "relu2")  # GPTConfig.mlp_act: GELU's tanh approximation (GPT-2's), relu(x)**2
QK_NORM_EPS = 1e-6  # added to the mean square of each query/key head before the reciprocal square root
PADDED_GPT2_VOCAB_SIZE = 50304  # the same padded up to a multiple of 64: faster matmuls, unused rows never trained
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's checkpoints, by their hub names


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = PADDED_GPT2_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2
    rope: bool = False  # rotary position embedding instead of the learned wpe table
    rope_theta: float = 10000.0
    n_kv_head: int | None = None  # None means n_head (multi-head attention)
    # None: full causal attention. An int W: every layer sees itself and the W-1 tokens before it.
    # A tuple/list with one entry per layer (int or None) mixes local and global layers.
    window: int | tuple | list | None = None
    qk_norm: bool = False  # RMS-normalise each query and key head (no learned scale) before the rotary embedding
    mlp_act: str = "gelu"  # one of MLP_ACTIVATIONS

    # the fields a pretrained checkpoint lets a user change when loading it; its weights fix the others
    PRETRAINED_OVERRIDES = ("block_size", "dropout", "n_kv_head", "window")

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not isinstance(self.n_kv_head, int) or self.n_kv_head < 1 or self.n_head % self.n_kv_head != 0:
            raise ConfigError(f"GPTConfig.n_kv_head={self.n_kv_head!r} must be a positive integer that divides n_head={self.n_head}")
        if self.rope and self.head_dim % 2 != 0:
            raise ConfigError(f"rope needs an even head dimension, got n_embd/n_head = {self.head_dim}")
        if self.rope and not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"GPTConfig.rope_theta must be a positive finite number, got {self.rope_theta!r}")
        if not isinstance(self.qk_norm, bool):
            raise ConfigError(f"GPTConfig.qk_norm must be True or False, got {self.qk_norm!r}")
        if self.mlp_act not in MLP_ACTIVATIONS:
            raise ConfigError(f"GPTConfig.mlp_act must be one of {', '.join(MLP_ACTIVATIONS)}, got {self.mlp_act!r}")
        windows = self.window if isinstance(self.window, (tuple, list)) else [self.window]
        if isinstance(self.window, (tuple, list)):
            if len(self.window) != self.n_layer:
                raise ConfigError(f"GPTConfig.window has {len(self.window)} entries but n_layer={self.n_layer}; "
                                  f"give one per layer (None for a global layer)")
            self.window = tuple(self.window)  # hashable and JSON-friendly after asdict
        for w in windows:
            if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
                raise ConfigError(f"GPTConfig.window must be None or an integer >= 1, got {w!r}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def layer_window(self, layer):
        """The window of one layer: None for full causal attention."""
        return self.window[layer] if isinstance(self.window, tuple) else self.window

    def to_dict(self):
        d = asdict(self)
        if isinstance(d["window"], tuple):
            d["window"] = list(d["window"])
        return d

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


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


# -----------------------------------------------------------------------------
# Attention kernels. causal_attention picks one of ATTENTION_IMPLS ('auto' chooses by device and shape).
# All take q (B, H, T, D) and k, v (B, Hkv, S, D), with H a multiple of Hkv:
# query head h uses key/value head h // (H // Hkv), SDPA's enable_gqa convention.

ATTENTION_IMPLS = ("auto", "dense", "blocked", "flex")


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
    return x.device.type == "cpu" and low_precision and T * head_dim < 32768


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None, impl: str = "auto",
                     dropout_p: float = 0.0) -> torch.Tensor:
    """
    Picks the kernel. impl: one of ATTENTION_IMPLS.
    'auto' uses dense SDPA unless a window is much shorter than a long sequence, where the blocked
    kernel's linear cost wins; on CUDA under torch.compile it uses FlexAttention's block-sparse kernel
    (without compile FlexAttention runs an unfused reference path, slower than the blocked kernel).
    """
    T = q.shape[-2]
    if attends_in_float32(q, T, q.shape[-1]):
        with torch.autocast("cpu", enabled=False):
            return causal_attention(q.float(), k.float(), v.float(), window, impl, dropout_p).to(q.dtype)
    if window is None or window >= T or impl == "dense":
        return dense_attention(q, k, v, window, dropout_p)
    if impl == "auto":
        if q.device.type == "cuda" and dropout_p == 0.0 and torch.compiler.is_compiling():
            impl = "flex"
        else:
            # the blocked kernel's padded bands cost more than they save on short sequences; from T=512 on
            # they save more (measured with bench.py --mode=attention on a CPU, windows 16 and 64)
            impl = "blocked" if T >= max(4 * window, 512) else "dense"
    if impl == "flex":
        if dropout_p > 0.0:
            raise ConfigError("the flex attention kernel has no dropout; use attn_impl='blocked' or dropout=0")
        return flex_window_attention(q, k, v, window)
    if impl == "blocked":
        return blocked_local_attention(q, k, v, window, dropout_p=dropout_p)
    return dense_attention(q, k, v, window, dropout_p)


# -----------------------------------------------------------------------------
# Key/value cache for generation

class KVCache:
    """
    Per-layer key/value buffers for incremental decoding, n_kv_head heads wide (GQA shrinks it).
    A global layer holds every position up to `max_positions`; a windowed layer holds a rolling
    buffer of its last `window` positions (position p lives in slot p % window), so its memory stays
    constant however long generation runs. Attention over the buffer ignores slot order: positions
    are already in the keys (RoPE) or in the residual stream (learned wpe).
    """

    def __init__(self, config: "GPTConfig", batch_size: int, max_positions: int, device: str | torch.device,
                 dtype: torch.dtype) -> None:
        self.pos = 0  # number of positions processed so far (absolute position of the next token)
        self.keys, self.values, self.windows = [], [], []
        for layer in range(config.n_layer):
            w = config.layer_window(layer)
            size = max_positions if w is None else min(w, max_positions)
            shape = (batch_size, config.n_kv_head, size, config.head_dim)
            self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
            self.values.append(torch.zeros(shape, device=device, dtype=dtype))
            self.windows.append(w)

    @staticmethod
    def positions_needed(config: "GPTConfig", context_len: int, max_new_tokens: int, beyond_block_size: bool = False) -> int:
        """How many positions a cache filled with `context_len` tokens must hold for max_new_tokens more:
        all of them with rope and beyond_block_size (positions run on), otherwise at most block_size
        (learned positions slide the context back instead of growing)."""
        positions = context_len + max_new_tokens
        return positions if config.rope and beyond_block_size else min(positions, config.block_size)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) for positions pos..pos+T-1. Returns (keys, values): every position the
        layer's buffer holds now, the new ones included (a rolling buffer's slots are not in position order)."""
        T = k.shape[2]
        keys, values, w = self.keys[layer_idx], self.values[layer_idx], self.windows[layer_idx]
        size = keys.shape[2]
        # only a buffer exactly `window` long may roll: one cut shorter by max_positions would drop
        # positions still inside the window, so it fills up and then overflows like a global layer's
        rolling = w is not None and size == w
        if not rolling or self.pos + T <= size:  # no wrap-around: write in place
            if self.pos + T > size:
                raise ConfigError(f"KV cache holds {size} positions; generating past it needs a larger cache")
            keys[:, :, self.pos:self.pos + T] = k
            values[:, :, self.pos:self.pos + T] = v
            return keys[:, :, :self.pos + T], values[:, :, :self.pos + T]
        # rolling buffer (windowed layer). A prefill longer than the window keeps its last `size` positions
        if T > 1:
            if self.pos != 0:
                raise ConfigError("the rolling cache takes a multi-token prefill only when empty")
            last = torch.arange(T - size, T, device=k.device)
            keys[:, :, last % size] = k[:, :, -size:].to(keys.dtype)  # index writes do not cast by themselves
            values[:, :, last % size] = v[:, :, -size:].to(values.dtype)
            return keys, values
        slot = self.pos % size
        keys[:, :, slot:slot + 1] = k
        values[:, :, slot:slot + 1] = v
        return keys, values


# -----------------------------------------------------------------------------
# The model

class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.layer_idx, self.window, self.dropout = layer_idx, config.layer_window(layer_idx), config.dropout
        self.qk_norm = config.qk_norm
        # queries, keys and values in one projection, as GPT-2: [q (n_head*hd) | k (n_kv*hd) | v (n_kv*hd)]
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attn_impl = "auto"

    def forward(self, x, rope=None, kv_cache=None):
        B, T, C = x.shape
        qkv = self.c_attn(x)
        compute_dtype = qkv.dtype
        if kv_cache is None and attends_in_float32(qkv, T, self.head_dim):
            qkv = qkv.float()  # one cast for q, k and v (and rope) instead of one per tensor in causal_attention
        heads = qkv.view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        qk, v = heads.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=2)
        if self.qk_norm:  # before the rotation, though a rotation keeps the norm: the order does not matter
            qk = F.rms_norm(qk, (self.head_dim,), eps=QK_NORM_EPS)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k in one pass, against tables (T, 1, D)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, D)
        dropout_p = self.dropout if self.training else 0.0
        if kv_cache is None:  # training and evaluation: the tokens of x see each other
            y = causal_attention(q, k, v, self.window, self.attn_impl, dropout_p)
        else:  # generation: the new tokens see what the cache holds before them, and each other
            y = self.attend_through_cache(q, k, v, kv_cache, dropout_p)
        y = y.to(compute_dtype).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def attend_through_cache(self, q, k, v, kv_cache, dropout_p):
        T, first_new = q.shape[2], kv_cache.pos
        k_all, v_all = kv_cache.update(self.layer_idx, k, v)
        if first_new == 0:  # a prefill: the cache holds nothing older, and a rolling buffer may have dropped some of k
            return causal_attention(q, k, v, self.window, self.attn_impl, dropout_p)
        gqa = self.n_head != self.n_kv_head
        if T == 1:  # one new token sees everything the cache holds (the rolling buffer is its window)
            return F.scaled_dot_product_attention(q, k_all, v_all, enable_gqa=gqa)
        # several new tokens after cached ones (global layers, or windows not yet full: slots in position order)
        S = k_all.shape[2]
        key_pos = torch.arange(S, device=q.device)
        mask = causal_window_mask(key_pos[S - T:, None], key_pos[None, :], self.window)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=gqa)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.act = config.mlp_act

    def forward(self, x):
        h = self.c_fc(x)
        h = F.gelu(h, approximate="tanh") if self.act == "gelu" else F.relu(h).square()
        return self.dropout(self.c_proj(h))


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), rope, kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        )
        if not config.rope:
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.gradient_checkpointing = False  # recompute each block in backward to save activation memory

        for p, std in self._init_draws():
            torch.nn.init.normal_(p, mean=0.0, std=std) if std else torch.nn.init.zeros_(p)

    def _init_draws(self) -> Iterator[tuple[nn.Parameter, float]]:
        """
        GPT-2's initialisation, in the order it draws from the global RNG: (parameter, std) for a normal draw,
        (parameter, 0.0) for zeros. Modules in nn.Module.apply's order (lm_head last, so the tied embedding keeps
        lm_head's draw), then the projections into the residual stream again with std scaled by 1/sqrt(2 * n_layer).
        GPT() and init_sharded_weights both follow it, so a model initialised shard by shard is GPT()'s model.
        """
        modules = []
        self.apply(modules.append)
        for module in modules:
            if isinstance(module, nn.Linear):
                yield module.weight, 0.02
                if module.bias is not None:
                    yield module.bias, 0.0
            elif isinstance(module, nn.Embedding):
                yield module.weight, 0.02
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                yield p, 0.02 / math.sqrt(2 * self.config.n_layer)

    def get_num_params(self, non_embedding=False):
        """Parameters counted once (lm_head is tied to wte). non_embedding leaves out the position table."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def set_attention_impl(self, impl):
        """One of ATTENTION_IMPLS: how windowed layers compute attention."""
        if impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention impl must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
        for block in self.transformer.h:
            block.attn.attn_impl = impl

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        idx: (B, T) token ids. Returns (logits, loss): logits (B, T, vocab), or (B, 1, vocab) with
        last_only; loss is the mean cross-entropy against targets (-1 ignored), or None.
        With kv_cache, idx continues the sequence held in the cache, starting at position kv_cache.pos.
        """
        x = self.hidden_states(idx, kv_cache)
        if last_only:
            x = x[:, [-1], :]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx, kv_cache=None):
        """The final LayerNorm's output (B, T, n_embd) for token ids idx (B, T): all but the vocabulary projection."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if not self.config.rope and start + T > self.config.block_size:
            raise ConfigError(f"sequence of length {start + T} is longer than block_size={self.config.block_size} "
                              f"(learned position embedding)")
        x = self.transformer.wte(idx)
        rope = None
        if self.config.rope:
            positions = torch.arange(start, start + T, device=idx.device)
            cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype=x.dtype)
            rope = cos[:, None], sin[:, None]  # (T, 1, D): the layers rotate q and k laid out (B, T, heads, D)
        else:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and kv_cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)

    # -------------------------------------------------------------------------
    # Pretrained models in the Hugging Face format: OpenAI's GPT-2, and what export_hf.py writes

    @classmethod
    def from_pretrained(cls, name_or_path: str, override_args: dict | None = None) -> "GPT":
        """
        Loads OpenAI's GPT-2 ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl') or a local directory in the
        Hugging Face format, through transformers: GPT2LMHeadModel (learned positions, multi-head) or
        Starcoder2ForCausalLM (rotary, grouped-query, one sliding window or none), the two architectures
        export_hf.py writes. A checkpoint whose blocks differ from ours (activation, norm epsilon, MLP
        width, untied embeddings, scaled rotary, ...) is a ConfigError that names the field.
        override_args may set dropout, block_size (smaller only with learned positions), window, or
        n_kv_head: fewer key/value heads are made by mean-pooling the heads of each group (Ainslie et al., 2023).
        """
        from hf_bridge import load_pretrained
        return load_pretrained(cls, name_or_path, override_args)

    # -------------------------------------------------------------------------
    # Training helpers

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, fused=None, muon=None):
        """
        AdamW with weight decay on matrices and embeddings (dim >= 2) only; the fused kernel on CUDA and CPUs.
        muon: None, or the keyword arguments of optimizers.Muon (lr, momentum, ns_steps, weight_decay) for the
        weight matrices inside the blocks; AdamW then keeps the embeddings (and so the tied lm_head), norms and
        biases, as modded-nanogpt and nanochat split them, and both step together as an OptimizerGroup.
        Every param group records its peak_lr: the schedule scales each group's from there by one factor.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        matrices = {id(p) for p in self.transformer.h.parameters() if p.dim() == 2} if muon is not None else set()
        adam_params = [p for p in params if id(p) not in matrices]
        decay = [p for p in adam_params if p.dim() >= 2]
        no_decay = [p for p in adam_params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if fused is None:  # one kernel for every parameter, faster than the per-tensor loop on CPUs too
            fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None)
        if muon is None:
            optimizer = adamw
        else:
            from optimizers import Muon, OptimizerGroup
            optimizer = OptimizerGroup(adamw, Muon([p for p in params if id(p) in matrices], nesterov=True, **muon))
        for group in optimizer.param_groups:
            group["peak_lr"] = group["lr"]
        return optimizer

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per weight plus the attention scores (PaLM, appendix B)."""
        cfg = self.config
        n_params = self.get_num_params(non_embedding=True)
        attn = 0
        for layer in range(cfg.n_layer):
            w = cfg.layer_window(layer)
            # mean number of keys a query sees: causal (T+1)/2, windowed about W; the common 6N+12LHQT uses T
            context = seq_len if w is None else min(w, seq_len)
            attn += 12 * cfg.n_head * cfg.head_dim * context
        return 6 * n_params + attn

    # -------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, use_cache: bool = True, beyond_block_size: bool = False,
                        generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """
        Yields the next token (B, 1) max_new_tokens times, continuing idx (B, T).
        temperature=0 is greedy. With use_cache a single prefill pass fills a KVCache, then one
        position runs per step. Past block_size: a learned position table slides the context (keep
        the last half of it and prefill again); with rope and beyond_block_size the positions simply
        continue (rolling caches keep windowed layers constant in memory).
        """
        validate_sampling(max_new_tokens, temperature, top_k, top_p)
        if idx.shape[1] == 0:
            raise ConfigError("generation needs a prompt of at least one token")
        cfg = self.config
        B, T = idx.shape
        unbounded = cfg.rope and beyond_block_size
        # keys and values are cached in the dtype they are computed in: bf16/fp16 under autocast
        device_type = idx.device.type
        cache_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                       else self.lm_head.weight.dtype)
        decode_layout = self.cpu_decode_layout(B) if use_cache and device_type == "cpu" else nullcontext()
        with decode_layout:  # left also when the caller stops early: the model leaves as it came
            # every token so far, written in place: no concatenation of the whole sequence per token
            seq = idx.new_empty((B, T + max_new_tokens))
            seq[:, :T] = idx
            cache = None
            for known in range(T, T + max_new_tokens):  # the number of tokens known so far
                if not use_cache:
                    context = seq[:, :known] if unbounded else seq[:, max(0, known - cfg.block_size):known]
                    logits, _ = self(context, last_only=True)
                elif cache is None or (not unbounded and cache.pos >= cfg.block_size):
                    # (re)fill the cache from the prompt, or from the recent context after a slide
                    keep = known if unbounded else min(known, cfg.block_size if cache is None else cfg.block_size // 2)
                    positions = KVCache.positions_needed(cfg, keep, T + max_new_tokens - known, beyond_block_size)
                    cache = KVCache(cfg, B, positions, idx.device, cache_dtype)
                    logits, _ = self(seq[:, known - keep:known], kv_cache=cache, last_only=True)
                else:
                    logits, _ = self(seq[:, known - 1:known], kv_cache=cache, last_only=True)
                next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
                seq[:, known:known + 1] = next_token
                yield next_token

    @contextmanager
    def cpu_decode_layout(self, batch_size):
        """
        Stores, while inside, the float32 weights that a cached decoding step on a CPU reads faster as
        (in, out) than as nn.Linear's (out, in): MKL's matrix-vector product reads columns of (in, out)
        faster than rows of (out, in) (measured, experiments/decode_vs_transformers.sh). That holds for
        the vocabulary projection (tied to wte, whose lookups do not mind) at batch 1 and 8; for c_attn,
        attn.c_proj and mlp.c_fc at batch 1 only, and mlp.c_proj is faster as it is. The values and shapes
        stay; one matrix is copied at a time, so there is never a second copy of the model.
        """
        stored_in_out = []
        if self.lm_head.weight.dtype == torch.float32:
            stored_in_out = [self.lm_head.weight]
            if batch_size == 1:
                for block in self.transformer.h:
                    stored_in_out += [block.attn.c_attn.weight, block.attn.c_proj.weight, block.mlp.c_fc.weight]
            stored_in_out = [p for p in stored_in_out if p.is_contiguous()]
        try:
            for p in stored_in_out:
                p.data = p.data.t().contiguous().t()  # the same values and shape, stored (in, out)
            yield
        finally:
            for p in stored_in_out:
                p.data = p.data.contiguous()

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, beyond_block_size: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """idx (B, T) followed by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, beyond_block_size, generator))
        return torch.cat([idx] + new, dim=1)


def load_model_state(model, state_dict):
    """Strict load that names every missing, unexpected or mis-shaped tensor in one ValueError."""
    state_dict = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state_dict.items()}
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in expected]
    problems += [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                 for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ConfigError(f"checkpoint does not match the model architecture: {shown}")
    model.load_state_dict(state_dict)


def validate_sampling(max_new_tokens, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, vocab) -> token ids (B, 1). temperature 0 is argmax; top_k and top_p (nucleus) filter first."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
