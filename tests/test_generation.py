"""
Generation: the KV cache against the uncached forward (the reference), cached greedy decoding against
uncached greedy decoding, the cache's memory, and the sampling filters (temperature, top-k, top-p); the cache
sizes generate makes against positions_needed, and the decode path (weights re-laid (in, out) while decoding,
an in-place token buffer) against the plain forward.
"""

import itertools
from contextlib import contextmanager, nullcontext

import pytest
import torch

import generation
from generation import KVCache, sample_next_token, validate_sampling
from model import GPTConfig
from helpers import KV, ROPE, V, tiny_model

GENERATION_WINDOWS = [None, 3, 6, (2, None), (None, 5)]  # 6: a prompt shorter than the window, filled then rolled
COMBOS = list(itertools.product(ROPE, KV, GENERATION_WINDOWS))


def tokens(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def full_logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def check_steps_match_uncached(model, idx, prompt_len, max_positions):
    B, T = idx.shape
    cache = KVCache(model.config, B, max_positions, idx.device, torch.float32)
    with torch.no_grad():
        logits, _ = model(idx[:, :prompt_len], kv_cache=cache)
    torch.testing.assert_close(logits, full_logits(model, idx[:, :prompt_len]), atol=1e-5, rtol=0)
    buffers = [k.data_ptr() for k in cache.keys]
    for t in range(prompt_len, T):
        with torch.no_grad():
            logits, _ = model(idx[:, t:t + 1], kv_cache=cache)
        assert logits.shape == (B, 1, V)
        torch.testing.assert_close(logits[:, -1], full_logits(model, idx[:, :t + 1])[:, -1], atol=1e-5, rtol=0,
                                   msg=lambda m: f"position {t}: {m}")
    assert cache.pos == T
    assert [k.data_ptr() for k in cache.keys] == buffers  # written in place, never reallocated
    return cache


# -----------------------------------------------------------------------------
# the cache against the uncached forward

@pytest.mark.parametrize("rope, n_kv_head, window", COMBOS)
def test_kv_cache_steps_match_uncached_forward(rope, n_kv_head, window):
    model = tiny_model(rope=rope, n_kv_head=n_kv_head, window=window)
    idx = tokens(2, 26)  # well past every window
    cache = check_steps_match_uncached(model, idx, prompt_len=5, max_positions=26)
    for layer in range(2):
        w = model.config.layer_window(layer)
        assert cache.keys[layer].shape[2] == (26 if w is None else w)


@pytest.mark.parametrize("rope, n_kv_head, window", [(True, 2, 3), (True, None, (2, None)), (False, 1, None), (False, None, 6)])
@pytest.mark.parametrize("qk_norm, mlp_act", [(True, "gelu"), (True, "relu2")])
def test_kv_cache_with_qk_norm_and_relu2_matches_uncached_forward(rope, n_kv_head, window, qk_norm, mlp_act):
    model = tiny_model(rope=rope, n_kv_head=n_kv_head, window=window, qk_norm=qk_norm, mlp_act=mlp_act)
    check_steps_match_uncached(model, tokens(2, 20), prompt_len=5, max_positions=20)
    prompt = tokens(2, 5, seed=1)
    assert model.generate(prompt, 15, temperature=0).tolist() == model.generate(prompt, 15, temperature=0, use_cache=False).tolist()


@pytest.mark.parametrize("n_kv_head, window", [(None, None), (2, 3), (1, (3, None)), (2, (None, 6))])
def test_kv_cache_rope_beyond_block_size(n_kv_head, window):
    model = tiny_model(rope=True, n_kv_head=n_kv_head, window=window, block_size=16)
    idx = tokens(1, 34, seed=1)  # positions up to 33, block_size 16
    check_steps_match_uncached(model, idx, prompt_len=4, max_positions=40)


@pytest.mark.parametrize("window", [3, 6])
def test_kv_cache_prefill_longer_than_window_then_steps(window):
    # a prefill longer than the rolling buffer keeps only the last `window` positions
    model = tiny_model(rope=True, window=window, n_kv_head=2)
    check_steps_match_uncached(model, tokens(2, 20, seed=2), prompt_len=11, max_positions=20)


@pytest.mark.parametrize("rope", ROPE)
@pytest.mark.parametrize("window", [None, 24, (None, 30)])
def test_kv_cache_chunked_continuation(rope, window):
    # several tokens at a time after cached ones: global layers, and windows that are not yet full
    model = tiny_model(rope=rope, window=window, n_kv_head=2)
    idx = tokens(2, 24, seed=3)
    ref = full_logits(model, idx)
    cache = KVCache(model.config, 2, 24, "cpu", torch.float32)
    start = 0
    for size in (4, 3, 1, 7, 9):
        with torch.no_grad():
            logits, _ = model(idx[:, start:start + size], kv_cache=cache)
        torch.testing.assert_close(logits, ref[:, start:start + size], atol=1e-5, rtol=0)
        start += size
    assert start == 24 and cache.pos == 24


def test_kv_cache_last_only():
    model = tiny_model(rope=True, window=3)
    idx = tokens(2, 9)
    cache = KVCache(model.config, 2, 16, "cpu", torch.float32)
    with torch.no_grad():
        logits, _ = model(idx, kv_cache=cache, last_only=True)
    assert logits.shape == (2, 1, V)
    torch.testing.assert_close(logits[:, 0], full_logits(model, idx)[:, -1], atol=1e-5, rtol=0)


def test_kv_cache_overflow_raises():
    model = tiny_model(window=(4, None))
    cache = KVCache(model.config, 1, 8, "cpu", torch.float32)
    with torch.no_grad():
        model(tokens(1, 8), kv_cache=cache)
        with pytest.raises(ValueError, match="cache"):
            model(tokens(1, 1), kv_cache=cache)


def test_kv_cache_shorter_than_window_cannot_roll():
    # a windowed layer whose buffer is smaller than its window holds every position like a global
    # one; overflowing it must raise rather than silently drop positions still inside the window
    model = tiny_model(rope=True, window=10)
    cache = KVCache(model.config, 1, 6, "cpu", torch.float32)
    with torch.no_grad():
        model(tokens(1, 6), kv_cache=cache)
        with pytest.raises(ValueError, match="cache"):
            model(tokens(1, 1), kv_cache=cache)


def test_rolling_cache_rejects_multi_token_continuation():
    model = tiny_model(window=3)
    cache = KVCache(model.config, 1, 16, "cpu", torch.float32)
    with torch.no_grad():
        model(tokens(1, 5), kv_cache=cache)
        with pytest.raises(ValueError, match="prefill"):
            model(tokens(1, 2), kv_cache=cache)


def test_learned_positions_cache_cannot_pass_block_size():
    model = tiny_model(block_size=16)
    cache = KVCache(model.config, 1, 32, "cpu", torch.float32)
    with torch.no_grad():
        model(tokens(1, 16), kv_cache=cache)
        with pytest.raises(ValueError, match="block_size"):
            model(tokens(1, 1), kv_cache=cache)


# -----------------------------------------------------------------------------
# cached generation against uncached generation

@pytest.mark.parametrize("rope, n_kv_head, window", COMBOS)
def test_greedy_generate_cached_equals_uncached(rope, n_kv_head, window):
    model = tiny_model(rope=rope, n_kv_head=n_kv_head, window=window)
    prompt = tokens(2, 5)
    cached = model.generate(prompt, 20, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert cached.shape == (2, 25)
    assert torch.equal(cached[:, :5], prompt)
    assert cached.tolist() == uncached.tolist()


@pytest.mark.parametrize("rope, n_kv_head, window", COMBOS)
def test_sampled_generate_cached_equals_uncached(rope, n_kv_head, window):
    # random tiny models often fall into a one-token loop under greedy decoding; sampling with the
    # same seeded generator walks a varied path, so every cached step is exercised on new tokens
    model = tiny_model(rope=rope, n_kv_head=n_kv_head, window=window)
    prompt = tokens(2, 5)
    outs = [model.generate(prompt, 20, temperature=1.0, use_cache=use_cache,
                           generator=torch.Generator().manual_seed(7)) for use_cache in (True, False)]
    assert outs[0].tolist() == outs[1].tolist()
    assert len(set(outs[0][0, 5:].tolist())) > 5  # a varied continuation


@pytest.mark.parametrize("n_kv_head, window", [(None, None), (2, 4), (1, (3, None))])
def test_greedy_generate_rope_beyond_block_size(n_kv_head, window):
    model = tiny_model(rope=True, n_kv_head=n_kv_head, window=window, block_size=16)
    prompt = tokens(1, 5, seed=4)
    cached = model.generate(prompt, 30, temperature=0, use_cache=True, beyond_block_size=True)
    uncached = model.generate(prompt, 30, temperature=0, use_cache=False, beyond_block_size=True)
    assert cached.shape == (1, 35)
    assert cached.tolist() == uncached.tolist()
    # the uncached path really used the whole 35-token context: a manual greedy loop agrees
    idx = prompt
    for _ in range(30):
        idx = torch.cat([idx, full_logits(model, idx)[:, -1:].argmax(-1)], dim=1)
    assert idx.tolist() == cached.tolist()
    sampled = [model.generate(prompt, 30, temperature=1.0, use_cache=use_cache, beyond_block_size=True,
                              generator=torch.Generator().manual_seed(3)) for use_cache in (True, False)]
    assert sampled[0].tolist() == sampled[1].tolist()
    assert len(set(sampled[0][0, 16:].tolist())) > 5  # varied tokens past block_size


@pytest.mark.parametrize("rope", ROPE)
def test_generate_past_block_size_slides(rope):
    model = tiny_model(rope=rope, block_size=16, window=(3, None))
    prompt = tokens(2, 5, seed=5)
    cached = model.generate(prompt, 30, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 30, temperature=0, use_cache=False)
    for out in (cached, uncached):
        assert out.shape == (2, 35) and out.min() >= 0 and out.max() < V
        assert torch.equal(out[:, :5], prompt)
    # identical while the whole sequence fits in block_size
    assert cached[:, :16].tolist() == uncached[:, :16].tolist()
    # a prompt longer than block_size: both paths condition the first token on its last 16 tokens
    long_prompt = tokens(2, 21, seed=6)
    expected = full_logits(model, long_prompt[:, -16:])[:, -1:].argmax(-1)
    for use_cache in (True, False):
        out = model.generate(long_prompt, 3, temperature=0, use_cache=use_cache)
        assert torch.equal(out[:, 21:22], expected)


def test_sampled_generate_cached_equals_uncached_with_seeded_generator():
    model = tiny_model(rope=True, n_kv_head=2, window=(3, None))
    prompt = tokens(3, 4)
    outs = [model.generate(prompt, 20, temperature=0.9, top_k=20, top_p=0.95, use_cache=use_cache,
                           generator=torch.Generator().manual_seed(7)) for use_cache in (True, False)]
    assert outs[0].tolist() == outs[1].tolist()


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_stream_yields_greedy_tokens_one_at_a_time(use_cache):
    # the reference: a greedy loop over the uncached forward, written here
    model = tiny_model(seed=1, window=3)
    prompt = tokens(2, 4)
    expected = prompt
    for _ in range(7):
        expected = torch.cat([expected, full_logits(model, expected)[:, -1:].argmax(-1)], dim=1)
    assert all(len(set(row[4:].tolist())) > 3 for row in expected)  # varied: a stale or repeated token would show
    stream = model.generate_stream(prompt, 7, temperature=0, use_cache=use_cache)
    first = next(stream)  # a token comes out before the rest are computed
    assert first.shape == (2, 1) and torch.equal(first, expected[:, 4:5])
    rest = list(stream)
    assert len(rest) == 6 and all(t.shape == (2, 1) for t in rest)
    assert torch.equal(torch.cat([prompt, first] + rest, dim=1), expected)
    assert torch.equal(model.generate(prompt, 7, temperature=0, use_cache=use_cache), expected)
    assert list(model.generate_stream(prompt, 0)) == [] and torch.equal(model.generate(prompt, 0), prompt)


# -----------------------------------------------------------------------------
# cache memory

@pytest.mark.parametrize("dtype, nbytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_kv_cache_nbytes(dtype, nbytes):
    n_kv_head, head_dim, B, max_positions = 2, 8, 3, 50
    cfg = GPTConfig(block_size=64, vocab_size=V, n_layer=4, n_head=4, n_embd=32, n_kv_head=n_kv_head,
                    window=(5, None, 100, 1))
    cache = KVCache(cfg, B, max_positions, "cpu", dtype)
    held = [5, 50, 50, 1]  # min(window, max_positions), or max_positions for a global layer
    assert cache.nbytes() == 2 * sum(B * n_kv_head * head_dim * h * nbytes for h in held)
    mha = KVCache(GPTConfig(block_size=64, vocab_size=V, n_layer=4, n_head=4, n_embd=32), B, max_positions, "cpu", dtype)
    assert mha.nbytes() == 2 * 4 * B * 4 * head_dim * 50 * nbytes  # GQA with 2 of 4 heads halves the global layers


def test_windowed_cache_does_not_grow_during_long_generation(monkeypatch):
    made = []

    class Recording(KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.first_ptrs = [k.data_ptr() for k in self.keys]
            made.append(self)

    monkeypatch.setattr(generation, "KVCache", Recording)
    model = tiny_model(rope=True, n_kv_head=1, window=(4, None), block_size=16)
    prompt, steps = tokens(1, 3), 80
    out = model.generate(prompt, steps, temperature=0, beyond_block_size=True)
    assert out.shape == (1, 3 + steps)
    assert len(made) == 1  # one cache for the whole run: no slide, no refill
    cache = made[0]
    assert cache.keys[0].shape == (1, 1, 4, 8) and cache.values[0].shape == (1, 1, 4, 8)
    assert [k.data_ptr() for k in cache.keys] == cache.first_ptrs
    assert cache.pos == 3 + steps - 1  # every token but the last sampled one went through the model
    assert cache.nbytes() == 2 * 1 * 8 * 4 * (4 + 3 + steps)


# -----------------------------------------------------------------------------
# sampling

def test_temperature_zero_and_top_k_one_are_argmax():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    argmax = logits.argmax(-1, keepdim=True)
    assert torch.equal(sample_next_token(logits, temperature=0), argmax)
    g = torch.Generator().manual_seed(1)
    for temperature in (0.5, 1.0, 3.0):
        assert torch.equal(sample_next_token(logits, temperature, top_k=1, generator=g), argmax)


def draws(probs, n=4000, seed=0, **kw):
    logits = torch.log(torch.tensor(probs)).expand(n, -1)  # one row per draw
    return sample_next_token(logits, generator=torch.Generator().manual_seed(seed), **kw)[:, 0]


def test_top_k_samples_only_the_k_largest():
    probs = [0.1, 0.3, 0.05, 0.25, 0.2, 0.1]
    got = set(draws(probs, top_k=3).tolist())
    assert got == {1, 3, 4}


@pytest.mark.parametrize("top_p, nucleus", [
    (0.4, {1}),  # the top token alone reaches 0.4
    (0.75, {1, 3}),  # 0.5 < 0.75 <= 0.5 + 0.3
    (0.85, {1, 3, 2}),  # 0.8 < 0.85 <= 0.95
    (0.99, {1, 3, 2, 0}),
    (1.0, {1, 3, 2, 0}),
])
def test_top_p_samples_exactly_the_smallest_nucleus(top_p, nucleus):
    probs = [0.05, 0.5, 0.15, 0.3]  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    samples = draws(probs, top_p=top_p)
    assert set(samples.tolist()) == nucleus
    # within the nucleus the probabilities are renormalised, not flattened
    mass = sum(probs[i] for i in nucleus)
    freq = (samples == 1).float().mean().item()
    assert abs(freq - 0.5 / mass) < 0.03


def test_top_p_applies_per_row():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.6, 0.1, 0.25, 0.05]])).repeat(2000, 1)
    samples = sample_next_token(logits, top_p=0.75, generator=torch.Generator().manual_seed(0)).view(2000, 2)
    assert set(samples[:, 0].tolist()) == {1, 3}
    assert set(samples[:, 1].tolist()) == {0, 2}


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-3), "top_k"),
    (dict(temperature=-0.5), "temperature"),
])
def test_validate_sampling_errors(kwargs, field):
    args = dict(max_new_tokens=5, temperature=1.0, top_k=None, top_p=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        validate_sampling(**args)
    with pytest.raises(ValueError, match=field):  # generate checks before doing any work
        tiny_model().generate(tokens(1, 3), **args)


def test_validate_sampling_accepts_valid():
    validate_sampling(0, 0.0, None, None)
    validate_sampling(10, 1.0, 1, 1.0)
    validate_sampling(10, 0.7, 50, 0.9)


def test_generate_empty_prompt_raises():
    with pytest.raises(ValueError, match="prompt"):
        tiny_model().generate(torch.zeros(1, 0, dtype=torch.long), 5)


# bf16 logits of this model are ~3 in size: one rounding step is ~0.016, a cache that drops or garbles
# positions is off by 2 or more
BF16_ATOL = 0.1


@pytest.mark.parametrize("window", [None, 4])
def test_cached_generation_under_bf16_autocast(window, monkeypatch):
    """Under bf16 autocast keys and values are bf16: the cache holds them as such (a rolling prefill
    longer than the window included), and each cached step matches the uncached forward at that
    position within bf16 rounding."""
    model = tiny_model(rope=True, n_kv_head=2, window=window)
    idx = tokens(1, 22)
    cache = KVCache(model.config, 1, 22, "cpu", torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx[:, :10], kv_cache=cache)
        for t in range(10, 22):
            step = model(idx[:, t:t + 1], kv_cache=cache)[0][:, -1].float()
            full = model(idx[:, :t + 1])[0][:, -1].float()
            torch.testing.assert_close(step, full, atol=BF16_ATOL, rtol=0, msg=lambda m: f"position {t}: {m}")

    # generate() under autocast makes its cache bf16, and every token it picks greedily is the argmax of
    # the uncached forward up to bf16 rounding (exact equality would hang on near-ties)
    made = []

    class Recording(KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(generation, "KVCache", Recording)
    prompt = idx[:, :10]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(prompt, 12, temperature=0, use_cache=True)
        with torch.no_grad():
            logits = model(out[:, :-1])[0][0, 9:].float()  # the uncached logits that chose tokens 10..21
    assert len(made) == 1
    assert all(t.dtype == torch.bfloat16 for t in made[0].keys + made[0].values)
    chosen = logits.gather(-1, out[0, 10:, None])[:, 0]
    assert (chosen >= logits.max(-1).values - BF16_ATOL).all(), (chosen, logits.max(-1).values)
    assert len(set(out[0, 10:].tolist())) > 3  # a varied continuation, not one repeated token


# -----------------------------------------------------------------------------
# the cache sizes generate makes, and the decode path (weights re-laid (in, out) while decoding, an in-place
# token buffer) against the plain forward

def record_caches(monkeypatch):
    made = []

    class Recording(KVCache):
        def __init__(self, config, batch_size, max_positions, device, dtype):
            super().__init__(config, batch_size, max_positions, device, dtype)
            made.append(max_positions)

    monkeypatch.setattr(generation, "KVCache", Recording)
    return made


@pytest.mark.parametrize("overrides, prompt, steps, beyond", [
    (dict(), 5, 10, False),  # fits: prompt + new tokens
    (dict(), 40, 10, False),  # prompt longer than block_size: capped
    (dict(), 5, 60, False),  # slides past block_size: a second cache for the rest
    (dict(rope=True), 5, 60, True),  # rope beyond block_size: one cache for everything
    (dict(rope=True, window=4), 5, 30, True),
])
def test_generate_sizes_its_caches_by_positions_needed(monkeypatch, overrides, prompt, steps, beyond):
    model = tiny_model(**overrides)  # block_size 32
    made = record_caches(monkeypatch)
    idx = torch.randint(0, 64, (2, prompt), generator=torch.Generator().manual_seed(0))
    out = model.generate(idx, steps, temperature=0, beyond_block_size=beyond)
    assert out.shape == (2, prompt + steps)
    cfg = model.config
    first_context = prompt if beyond else min(prompt, cfg.block_size)
    assert made[0] == KVCache.positions_needed(cfg, first_context, steps, beyond)
    if beyond or prompt + steps <= cfg.block_size:
        assert len(made) == 1
    else:  # learned positions slide: the kept half of the block, then what is left to generate
        assert len(made) >= 2 and all(m <= cfg.block_size for m in made)


def test_positions_needed_arithmetic():
    cfg = GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=8)
    rope = GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=8, rope=True)
    assert KVCache.positions_needed(cfg, 5, 10) == 15
    assert KVCache.positions_needed(cfg, 30, 10) == 32
    assert KVCache.positions_needed(cfg, 30, 10, beyond_block_size=True) == 32  # learned positions cannot run on
    assert KVCache.positions_needed(rope, 30, 10) == 32
    assert KVCache.positions_needed(rope, 30, 10, beyond_block_size=True) == 40


@pytest.mark.parametrize("overrides", [dict(), dict(rope=True, n_kv_head=2, window=5)])
def test_forward_is_hidden_states_then_head(overrides):
    model = tiny_model(**overrides)
    idx = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(idx)
        assert torch.equal(logits, model.lm_head(model.hidden_states(idx)))
        # decoding reads the head stored (in, out): the same products
        head = model.lm_head.weight.t().contiguous().t()
        torch.testing.assert_close(torch.nn.functional.linear(model.hidden_states(idx), head), logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("overrides, beyond", [(dict(), False), (dict(rope=True, n_kv_head=1, window=(4, None)), True)])
def test_greedy_decode_is_argmax_of_the_full_forward(overrides, beyond, batch):
    """Every token generate picks (cached, in-place buffer, weights re-laid (in, out), slides past block_size) is the
    argmax of the plain uncached forward over the sequence so far."""
    model = tiny_model(**overrides)
    idx = torch.randint(0, 64, (batch, 6), generator=torch.Generator().manual_seed(2))
    out = model.generate(idx, 40, temperature=0, beyond_block_size=beyond)  # 46 > block_size 32
    assert torch.equal(out[:, :6], idx)
    with torch.no_grad():
        start = None  # learned positions: the context starts here, at position 0
        for n in range(6, 46):
            if beyond:
                context = out[:, :n]
            else:  # the reference slide: the first context is the last block_size tokens; when the tokens
                # before the newest one fill the block, the context starts afresh from the last half block
                if start is None:
                    start = max(0, n - 32)
                elif n - 1 - start >= 32:
                    start = n - 32 // 2
                context = out[:, start:n]
            expected = model(context)[0][:, -1].argmax(-1)
            assert torch.equal(out[:, n], expected), f"token {n}"


def test_generate_stream_leaves_the_prompt_alone():
    model = tiny_model()
    idx = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(3))
    before = idx.clone()
    tokens = list(model.generate_stream(idx, 5, temperature=0))
    assert torch.equal(idx, before) and len(tokens) == 5 and all(t.shape == (1, 1) for t in tokens)



def parameter_snapshot(model):
    return {name: (p.detach().clone(), p.is_contiguous()) for name, p in model.named_parameters()}


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_layout_is_restored(batch):
    """generate_stream stores some weights (in, out) while it decodes on a CPU; afterwards, and after a
    caller that stops early, every parameter holds the same values in the same layout as before."""
    model = tiny_model()
    before = parameter_snapshot(model)
    idx = torch.randint(0, 64, (batch, 4), generator=torch.Generator().manual_seed(4))
    stream = model.generate_stream(idx, 10, temperature=0)
    next(stream)
    relaid = [name for name, p in model.named_parameters() if not p.is_contiguous()]
    expected = {"transformer.wte.weight"}  # lm_head's weight, named once since they are tied
    if batch == 1:
        expected |= {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")}
    assert set(relaid) == expected
    stream.close()  # a caller that stops early
    after = parameter_snapshot(model)
    for name, (value, contiguous) in before.items():
        assert torch.equal(after[name][0], value) and after[name][1] == contiguous, name
    model.generate(idx, 10, temperature=0)
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_layout_tokens_equal_the_plain_layout(batch, monkeypatch):
    """generate_stream with its weights re-laid (in, out) picks, greedily and sampled, exactly the tokens the
    same cached decoding picks with nn.Linear's own layout (the re-laying switched off)."""
    import copy
    model = tiny_model()
    plain = copy.deepcopy(model)  # a model that has never decoded: nothing re-laid can have leaked into it
    idx = torch.randint(0, 64, (batch, 5), generator=torch.Generator().manual_seed(6))

    def decode(m):
        return [torch.cat(list(m.generate_stream(idx, 25, temperature=temperature, generator=torch.Generator().manual_seed(7))),
                          dim=1) for temperature in (0, 1.0)]

    seen = []
    real_layout = generation.cpu_decode_layout

    @contextmanager
    def recording_layout(m, batch_size):
        # the plain copy keeps nn.Linear's layout; the model enters the real re-layout and counts what it re-laid
        with (real_layout(m, batch_size) if m is model else nullcontext()):
            seen.append((m is model, sum(not p.is_contiguous() for p in m.parameters())))
            yield
    monkeypatch.setattr(generation, "cpu_decode_layout", recording_layout)
    relaid_tokens, plain_tokens = decode(model), decode(plain)
    assert seen == [(True, seen[0][1])] * 2 + [(False, 0)] * 2 and seen[0][1] >= 1  # re-laid in the first decodes only
    for a, b in zip(relaid_tokens, plain_tokens):
        assert torch.equal(a, b)
    assert len(set(relaid_tokens[1][0].tolist())) >= 4  # sampled, varied tokens: a wrong layout would show


def test_decode_layout_gives_the_same_tokens():
    """The (in, out) layout changes how the weights are read, not the tokens: batch 1 (every listed
    matrix re-laid) and the same rows inside batch 2 (only the vocabulary projection) agree."""
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(5))
    together = model.generate(idx, 20, temperature=0)
    for row in range(2):
        assert torch.equal(model.generate(idx[row:row + 1], 20, temperature=0), together[row:row + 1])

