"""
The speed work on attention masks, the KV cache and decoding keeps the outputs exact: the one mask rule
against an explicit double loop, the cache sizes generate makes against positions_needed, and the decode
path (weights re-laid (in, out) while decoding, an in-place token buffer) against the plain forward.
"""

from contextlib import contextmanager, nullcontext
import pytest
import torch

import generation
from conftest import tiny_model
from model import GPTConfig
from generation import KVCache
from attention import causal_window_mask


def loop_mask(query_positions, key_positions, window):
    """i - W < j <= i, written out element by element."""
    return torch.tensor([[j <= i and (window is None or j > i - window) for j in key_positions] for i in query_positions])


@pytest.mark.parametrize("window", [None, 1, 3, 100])
def test_causal_window_mask_is_the_rule(window):
    keys = torch.arange(12)
    assert torch.equal(causal_window_mask(keys[:, None], keys[None, :], window), loop_mask(range(12), range(12), window))
    # the last 4 queries of a sequence whose 12 keys are cached (a chunked continuation)
    assert torch.equal(causal_window_mask(keys[8:, None], keys[None, :], window), loop_mask(range(8, 12), range(12), window))


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


def snapshot(model):
    return {name: (p.detach().clone(), p.is_contiguous()) for name, p in model.named_parameters()}


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_layout_is_restored(batch):
    """generate_stream stores some weights (in, out) while it decodes on a CPU; afterwards, and after a
    caller that stops early, every parameter holds the same values in the same layout as before."""
    model = tiny_model()
    before = snapshot(model)
    idx = torch.randint(0, 64, (batch, 4), generator=torch.Generator().manual_seed(4))
    stream = model.generate_stream(idx, 10, temperature=0)
    next(stream)
    relaid = [name for name, p in model.named_parameters() if not p.is_contiguous()]
    expected = {"transformer.wte.weight"}  # lm_head's weight, named once since they are tied
    if batch == 1:
        expected |= {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")}
    assert set(relaid) == expected
    stream.close()  # a caller that stops early
    after = snapshot(model)
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
