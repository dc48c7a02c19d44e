"""
Generation (nanochat's engine): a model continues a prompt one token at a time. generate_stream runs the
loop (a prefill into a KVCache, then one position per step, or the whole context per step without a
cache), sample_next_token picks each token, and cpu_decode_layout re-lays some weights while a CPU decodes.
GPT.generate and GPT.generate_stream call these.
"""

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch.nn import functional as F

from errors import ConfigError


class KVCache:
    """
    Per-layer key/value buffers for incremental decoding, n_kv_head heads wide (GQA shrinks it).
    A global layer holds every position up to `max_positions`; a windowed layer holds a rolling
    buffer of its last `window` positions (position p lives in slot p % window), so its memory stays
    constant however long generation runs. Attention over the buffer ignores slot order: positions
    are already in the keys (RoPE) or in the residual stream (learned wpe).
    """

    def __init__(self, config, batch_size: int, max_positions: int, device: str | torch.device,
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
    def positions_needed(config, context_len: int, max_new_tokens: int, beyond_block_size: bool = False) -> int:
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
# Generation

@torch.no_grad()
def generate_stream(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
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
    cfg = model.config
    B, T = idx.shape
    unbounded = cfg.rope and beyond_block_size
    # keys and values are cached in the dtype they are computed in: bf16/fp16 under autocast
    device_type = idx.device.type
    cache_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                   else model.lm_head.weight.dtype)
    decode_layout = cpu_decode_layout(model, B) if use_cache and device_type == "cpu" else nullcontext()
    with decode_layout:  # left also when the caller stops early: the model leaves as it came
        # every token so far, written in place: no concatenation of the whole sequence per token
        seq = idx.new_empty((B, T + max_new_tokens))
        seq[:, :T] = idx
        cache = None
        for known in range(T, T + max_new_tokens):  # the number of tokens known so far
            if not use_cache:
                context = seq[:, :known] if unbounded else seq[:, max(0, known - cfg.block_size):known]
                logits, _ = model(context, last_only=True)
            elif cache is None or (not unbounded and cache.pos >= cfg.block_size):
                # (re)fill the cache from the prompt, or from the recent context after a slide
                keep = known if unbounded else min(known, cfg.block_size if cache is None else cfg.block_size // 2)
                positions = KVCache.positions_needed(cfg, keep, T + max_new_tokens - known, beyond_block_size)
                cache = KVCache(cfg, B, positions, idx.device, cache_dtype)
                logits, _ = model(seq[:, known - keep:known], kv_cache=cache, last_only=True)
            else:
                logits, _ = model(seq[:, known - 1:known], kv_cache=cache, last_only=True)
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
            seq[:, known:known + 1] = next_token
            yield next_token

@contextmanager
def cpu_decode_layout(model, batch_size):
    """
    Stores, while inside, the float32 weights that a cached decoding step on a CPU reads faster as
    (in, out) than as nn.Linear's (out, in): MKL's matrix-vector product reads columns of (in, out)
    faster than rows of (out, in) (measured, experiments/decode_vs_transformers.sh). That holds for
    the vocabulary projection (tied to wte, whose lookups do not mind) at batch 1 and 8; for c_attn,
    attn.c_proj and mlp.c_fc at batch 1 only, and mlp.c_proj is faster as it is. The values and shapes
    stay; one matrix is copied at a time, so there is never a second copy of the model.
    """
    stored_in_out = []
    if model.lm_head.weight.dtype == torch.float32:
        stored_in_out = [model.lm_head.weight]
        if batch_size == 1:
            for block in model.transformer.h:
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
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, use_cache: bool = True, beyond_block_size: bool = False,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """idx (B, T) followed by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
    new = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, use_cache, beyond_block_size, generator))
    return torch.cat([idx] + new, dim=1)


# -----------------------------------------------------------------------------
# Sampling

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
