"""
RoPE, grouped-query attention and sliding windows against references written here: a naive
attention with an explicit causal+window mask and explicit key/value head repetition, and RoPE from
transformers' Llama code. Nothing in this file's references comes from model.py. Also: the one mask rule
against an explicit double loop, CPU bf16 attention computed in fp32, and the flex kernel's refusal of dropout.
"""

import itertools
import math

import pytest
import torch

import attention
from model import GPT, GPTConfig
from attention import causal_window_mask
from errors import ConfigError
from helpers import KV, ROPE, forward_backward, logits_of, naive_attention, tiny_model

from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb, rotate_half


# -----------------------------------------------------------------------------
# references


def reference_cos_sin(positions, head_dim, theta):
    """Split-halves RoPE tables, as transformers' Llama builds them: (T, head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = positions.double()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def rms_per_head(x, eps=1e-6):
    """Each head's vector divided by its root mean square (QK-norm without a learned scale)."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def relu_squared(x):
    return torch.where(x > 0, x * x, torch.zeros_like(x))


def reference_forward(model, idx, rope, n_head, n_kv_head, windows, theta=10000.0, qk_norm=False, mlp_act="gelu"):
    """The whole model by hand from its parameters. windows: one entry per layer."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    B, T = idx.shape
    C = sd["transformer.wte.weight"].shape[1]
    D = C // n_head
    x = sd["transformer.wte.weight"][idx]
    if not rope:
        x = x + sd["transformer.wpe.weight"][:T]
    else:
        cos, sin = reference_cos_sin(torch.arange(T), D, theta)
    for layer, window in enumerate(windows):
        p = f"transformer.h.{layer}."
        h = layer_norm(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        qkv = h @ sd[p + "attn.c_attn.weight"].t() + sd[p + "attn.c_attn.bias"]
        q = qkv[..., :n_head * D].reshape(B, T, n_head, D).transpose(1, 2)
        k = qkv[..., n_head * D:(n_head + n_kv_head) * D].reshape(B, T, n_kv_head, D).transpose(1, 2)
        v = qkv[..., (n_head + n_kv_head) * D:].reshape(B, T, n_kv_head, D).transpose(1, 2)
        assert v.shape[-1] == D
        if qk_norm:
            q, k = rms_per_head(q), rms_per_head(k)
        if rope:
            q, _ = apply_rotary_pos_emb(q, q, cos[None], sin[None])
            k, _ = apply_rotary_pos_emb(k, k, cos[None], sin[None])
        y = naive_attention(q, k, v, window).transpose(1, 2).reshape(B, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"].t() + sd[p + "attn.c_proj.bias"]
        h = layer_norm(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = h @ sd[p + "mlp.c_fc.weight"].t() + sd[p + "mlp.c_fc.bias"]
        h = gelu_tanh(h) if mlp_act == "gelu" else relu_squared(h)
        x = x + h @ sd[p + "mlp.c_proj.weight"].t() + sd[p + "mlp.c_proj.bias"]
    x = layer_norm(x, sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"])
    return x @ sd["transformer.wte.weight"].t()


ATTENTION_WINDOWS = [None, 3, (2, None)]


def per_layer(window, n_layer):
    return list(window) if isinstance(window, tuple) else [window] * n_layer


# -----------------------------------------------------------------------------
# the whole model against the reference forward

@pytest.mark.parametrize("impl", ["auto", "dense", "blocked"])
@pytest.mark.parametrize("rope, n_kv_head, window", list(itertools.product(ROPE, KV, ATTENTION_WINDOWS)))
def test_model_matches_reference_forward(rope, n_kv_head, window, impl):
    model = tiny_model(rope=rope, n_kv_head=n_kv_head, window=window)
    model.set_attention_impl(impl)
    torch.manual_seed(1)
    idx = torch.randint(0, 64, (2, 13))  # 'auto' picks dense SDPA at this length (test_auto_switch_at_its_threshold)
    ref = reference_forward(model, idx, rope, 4, n_kv_head or 4, per_layer(window, 2))
    assert ref.std() > 0.5
    torch.testing.assert_close(logits_of(model, idx), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("qk_norm, mlp_act", [(True, "gelu"), (False, "relu2"), (True, "relu2")])
@pytest.mark.parametrize("rope, n_kv_head, window", [(False, None, None), (True, 2, 3), (True, 1, (2, None)), (False, 2, 3)])
def test_qk_norm_and_relu2_match_reference_forward(rope, n_kv_head, window, qk_norm, mlp_act):
    model = tiny_model(rope=rope, n_kv_head=n_kv_head, window=window, qk_norm=qk_norm, mlp_act=mlp_act)
    idx = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    ref = reference_forward(model, idx, rope, 4, n_kv_head or 4, per_layer(window, 2), qk_norm=qk_norm, mlp_act=mlp_act)
    plain = reference_forward(model, idx, rope, 4, n_kv_head or 4, per_layer(window, 2))
    assert (ref - plain).abs().max() > 0.1  # the setting changes the function: the comparison below can tell
    torch.testing.assert_close(logits_of(model, idx), ref, atol=1e-5, rtol=0)


def test_qk_norm_makes_attention_independent_of_query_and_key_scale():
    """Scaling the query and key rows of c_attn leaves a QK-normed model unchanged (up to the eps)."""
    model = tiny_model(rope=True, qk_norm=True)
    idx = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(2))
    before = logits_of(model, idx)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:64] *= 7.0
            block.attn.c_attn.bias[:64] *= 7.0
    torch.testing.assert_close(logits_of(model, idx), before, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_model_flex_impl_matches_reference_forward():
    model = tiny_model(rope=True, n_kv_head=2, window=(3, None))
    model.set_attention_impl("flex")
    idx = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(0))
    ref = reference_forward(model, idx, True, 4, 2, [3, None])
    torch.testing.assert_close(logits_of(model, idx), ref, atol=1e-5, rtol=0)


def test_set_attention_impl_rejects_unknown():
    with pytest.raises(ValueError, match="impl"):
        tiny_model().set_attention_impl("fast")


# -----------------------------------------------------------------------------
# the kernels against the naive reference, forward and backward

KERNEL_CASES = [
    # (H, Hkv, T, window, block): T not a multiple of the block; windows 1, 5, 64
    (4, 4, 37, 1, None),
    (4, 4, 37, 5, None),
    (4, 2, 70, 5, None),
    (4, 1, 70, 64, None),
    (4, 2, 37, 5, 16),
    (4, 4, 37, 1, 16),
    (4, 1, 100, 64, 16),
    (6, 3, 45, 7, 8),
]


def qkv(H, Hkv, T, D=8, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    grad = torch.randn(B, H, T, D, generator=g)
    return q, k, v, grad



def assert_kernel_matches(fn, H, Hkv, T, window, backward=True, device="cpu"):
    q, k, v, grad = (t.to(device) for t in qkv(H, Hkv, T))
    if not backward:
        with torch.no_grad():
            torch.testing.assert_close(fn(q, k, v), naive_attention(q, k, v, window), atol=1e-5, rtol=0)
        return
    ours = forward_backward(fn, q, k, v, grad)
    ref = forward_backward(lambda a, b, c: naive_attention(a, b, c, window), q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("H, Hkv, T, window, block", KERNEL_CASES)
def test_blocked_local_attention_matches_naive(H, Hkv, T, window, block):
    assert_kernel_matches(lambda q, k, v: attention.blocked_local_attention(q, k, v, window, block=block), H, Hkv, T, window)


@pytest.mark.parametrize("H, Hkv, T, window, block", KERNEL_CASES)
def test_dense_attention_window_matches_naive(H, Hkv, T, window, block):
    assert_kernel_matches(lambda q, k, v: attention.dense_attention(q, k, v, window), H, Hkv, T, window)


@pytest.mark.parametrize("H, Hkv, T", [(4, 4, 37), (4, 1, 20)])
def test_dense_attention_full_matches_naive(H, Hkv, T):
    for window in (None, T, T + 5):  # window >= T is full causal attention
        assert_kernel_matches(lambda q, k, v: attention.dense_attention(q, k, v, window), H, Hkv, T, None)


def test_window_changes_the_result():
    # guard for the comparisons above: a window really cuts keys away
    q, k, v, _ = qkv(4, 2, 37)
    assert (naive_attention(q, k, v, 5) - naive_attention(q, k, v)).abs().max() > 0.1
    assert (attention.blocked_local_attention(q, k, v, 5) - naive_attention(q, k, v)).abs().max() > 0.1


def test_window_one_is_identity_on_values():
    # each query sees only itself: the output is its own value (via its kv head)
    q, k, v, _ = qkv(4, 2, 21)
    expected = v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(attention.blocked_local_attention(q, k, v, 1), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(attention.dense_attention(q, k, v, 1), expected, atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("H, Hkv, T, window, block", KERNEL_CASES[:5])
def test_flex_window_attention_forward_matches_naive(H, Hkv, T, window, block):
    assert_kernel_matches(lambda q, k, v: attention.flex_window_attention(q, k, v, window), H, Hkv, T, window, backward=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on a CPU in this torch: CUDA only")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_window_attention_backward_matches_naive():
    """Forward and backward of the flex kernel against the naive reference, on the GPU (the CPU forward is
    tested above; PyTorch implements no FlexAttention backward on a CPU)."""
    assert_kernel_matches(lambda a, b, c: attention.flex_window_attention(a, b, c, 5), 4, 2, 37, 5, device="cuda")


@pytest.mark.parametrize("window", [16, 200])
def test_auto_switch_at_its_threshold(window, monkeypatch):
    """'auto' takes the blocked kernel from T = max(4 * window, 512) on, dense SDPA below it, and both agree
    with the naive reference there."""
    threshold = max(4 * window, 512)
    taken = []
    for name in ("blocked_local_attention", "dense_attention"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, real=real, name=name, **k: taken.append(name) or real(*a, **k))
    for T, expected in ((threshold - 1, "dense_attention"), (threshold, "blocked_local_attention")):
        q, k, v, _ = qkv(2, 1, T, D=4, B=1)
        taken.clear()
        with torch.no_grad():
            out = attention.causal_attention(q, k, v, window, impl="auto")
        assert taken == [expected], (T, taken)
        torch.testing.assert_close(out, naive_attention(q, k, v, window), atol=1e-5, rtol=0)


@pytest.mark.parametrize("T, window", [(70, 5), (37, 1), (37, 20), (12, 12), (12, 30), (50, None)])
@pytest.mark.parametrize("Hkv", [4, 2])
def test_causal_attention_impls_agree(T, window, Hkv):
    q, k, v, _ = qkv(4, Hkv, T)
    ref = naive_attention(q, k, v, window)
    with torch.no_grad():
        for impl in ("auto", "blocked", "dense"):
            torch.testing.assert_close(attention.causal_attention(q, k, v, window, impl=impl), ref, atol=1e-5, rtol=0,
                                       msg=lambda m: f"impl={impl}: {m}")


# -----------------------------------------------------------------------------
# RoPE

def test_rope_matches_transformers_llama():
    theta, D, T = 500.0, 8, 11
    positions = torch.arange(3, 3 + T)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, T, D, generator=g)
    k = torch.randn(2, 2, T, D, generator=g)
    # tables: transformers' own Llama rotary embedding, and the formula written here
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=4 * D, num_attention_heads=4, head_dim=D, rope_theta=theta))
    hf_cos, hf_sin = rotary(q, positions[None])
    ref_cos, ref_sin = reference_cos_sin(positions, D, theta)
    torch.testing.assert_close(hf_cos[0], ref_cos, atol=1e-6, rtol=0)
    cos, sin = attention.rope_cos_sin(positions, D, theta)
    assert cos.shape == (T, D // 2)  # one angle per pair (i, i + D/2); transformers repeats it for both halves
    torch.testing.assert_close(torch.cat((cos, cos), dim=-1), hf_cos[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat((sin, sin), dim=-1), hf_sin[0], atol=1e-5, rtol=0)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(attention.apply_rope(q, cos, sin), q_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(attention.apply_rope(k, cos, sin), k_ref, atol=1e-5, rtol=0)
    # split halves, not interleaved pairs: dimension i turns with i + D/2
    x = torch.zeros(1, 1, 1, D)
    x[..., 0] = 1.0
    turned = attention.apply_rope(x, *attention.rope_cos_sin(torch.tensor([1]), D, theta))
    assert turned[..., D // 2].abs() > 0.5 and turned[..., 1].abs() < 1e-6
    torch.testing.assert_close(rotate_half(x)[..., D // 2], x[..., 0])


def test_rope_scores_depend_only_on_relative_position():
    D = 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, D, generator=g)
    k = torch.randn(1, 1, 1, D, generator=g)

    def score(m, n):
        qm = attention.apply_rope(q, *attention.rope_cos_sin(torch.tensor([m]), D, 10000.0))
        kn = attention.apply_rope(k, *attention.rope_cos_sin(torch.tensor([n]), D, 10000.0))
        return (qm * kn).sum().item()

    for offset in (0, 1, 3, 10):
        scores = [score(base + offset, base) for base in (0, 7, 50, 123)]
        assert max(scores) - min(scores) < 1e-4, (offset, scores)
    assert len({round(score(m, 0), 3) for m in (0, 1, 3, 10)}) == 4  # but it does depend on m - n
    assert abs(score(0, 0) - (q * k).sum().item()) < 1e-5  # no rotation at distance 0


# -----------------------------------------------------------------------------
# black-box properties of the whole model

ARCHITECTURES = [dict(rope=r, n_kv_head=kv, window=w) for r, kv, w in itertools.product(ROPE, KV, ATTENTION_WINDOWS)]


@pytest.mark.parametrize("variant", ARCHITECTURES, ids=str)
def test_causality(variant):
    model = tiny_model(**variant)
    idx = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    base = logits_of(model, idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % 64
        out = logits_of(model, changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-3


@pytest.mark.parametrize("rope", ROPE)
@pytest.mark.parametrize("n_layer, window, n_kv_head", [(2, 3, None), (3, 2, 1), (2, 4, 2)])
def test_receptive_field_of_a_windowed_stack(rope, n_layer, window, n_kv_head):
    model = tiny_model(rope=rope, n_layer=n_layer, window=window, n_kv_head=n_kv_head)
    idx = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(0))
    base = logits_of(model, idx)
    reach = n_layer * (window - 1)
    t = 4
    changed = idx.clone()
    changed[0, t] = (changed[0, t] + 7) % 64
    diff = (logits_of(model, changed) - base).abs().amax(dim=-1)[0]  # per position
    assert diff[:t].max() < 1e-6
    assert diff[t + reach] > 1e-4, "the far edge of the receptive field should feel the change"
    assert diff[t + reach + 1:].max() < 1e-6, "nothing past t + L*(W-1) may change"


@pytest.mark.parametrize("n_kv_head", [None, 1])
def test_rope_window_logits_independent_of_absolute_position(n_kv_head):
    L, W = 2, 3
    model = tiny_model(rope=True, n_layer=L, window=W, n_kv_head=n_kv_head)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 64, (1, 8), generator=g)
    outs = []
    for junk_len in (L * (W - 1), 9, 21):
        junk = torch.randint(0, 64, (1, junk_len), generator=g)
        outs.append(logits_of(model, torch.cat([junk, text], dim=1))[:, -(8 - L * (W - 1)):])
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], atol=1e-5, rtol=0)
    # control: without the window the junk is visible
    full = tiny_model(rope=True, n_layer=L, n_kv_head=n_kv_head)
    a = logits_of(full, torch.cat([torch.zeros(1, 4, dtype=torch.long), text], 1))[:, -1]
    b = logits_of(full, torch.cat([torch.ones(1, 9, dtype=torch.long), text], 1))[:, -1]
    assert (a - b).abs().max() > 1e-3


# -----------------------------------------------------------------------------
# GQA parameters and the MHA special case

def expected_param_count(V, T, L, H, Hkv, C, rope):
    D = C // H
    per_layer = (
        2 * C  # ln_1
        + C * (H + 2 * Hkv) * D + (H + 2 * Hkv) * D  # c_attn: q, k, v
        + C * C + C  # attn.c_proj
        + 2 * C  # ln_2
        + C * 4 * C + 4 * C + 4 * C * C + C  # mlp
    )
    return V * C + (0 if rope else T * C) + L * per_layer + 2 * C  # wte (tied with lm_head), wpe, blocks, ln_f


@pytest.mark.parametrize("rope", ROPE)
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_gqa_param_count(rope, n_kv_head):
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=3, n_head=4, n_embd=32, rope=rope, n_kv_head=n_kv_head))
    assert model.get_num_params() == expected_param_count(64, 32, 3, 4, n_kv_head, 32, rope)


@pytest.mark.parametrize("n_kv_head", [None, 4])
def test_n_kv_head_equal_to_n_head_is_gpt2_mha(n_kv_head):
    """n_kv_head == n_head (given, or by default) is GPT-2's multi-head attention: the state dict has
    transformers' GPT2LMHeadModel's names and shapes one to one (its Conv1D weights transposed), and
    GPT2LMHeadModel holding those weights computes the same logits."""
    from transformers import GPT2Config, GPT2LMHeadModel
    model = tiny_model(n_kv_head=n_kv_head)
    assert model.config.n_kv_head == 4
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                    eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    attn_implementation="eager")).eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    ours = {k: v.t() if k.endswith(conv1d) else v for k, v in model.state_dict().items()}
    theirs = hf.state_dict()
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    hf.load_state_dict(ours)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(idx).logits
    assert ref.std() > 0.5
    torch.testing.assert_close(logits_of(model, idx), ref, atol=1e-5, rtol=0)
    # and a GQA model's c_attn is narrower: n_head query heads, then n_kv_head key and value heads
    assert tiny_model(n_kv_head=2).transformer.h[0].attn.c_attn.weight.shape == ((4 + 2 * 2) * 8, 32)


# -----------------------------------------------------------------------------
# the one mask rule, CPU bf16, and the flex kernel with dropout

def loop_mask(query_positions, key_positions, window):
    """i - W < j <= i, written out element by element."""
    return torch.tensor([[j <= i and (window is None or j > i - window) for j in key_positions] for i in query_positions])


@pytest.mark.parametrize("window", [None, 1, 3, 100])
def test_causal_window_mask_is_the_rule(window):
    keys = torch.arange(12)
    assert torch.equal(causal_window_mask(keys[:, None], keys[None, :], window), loop_mask(range(12), range(12), window))
    # the last 4 queries of a sequence whose 12 keys are cached (a chunked continuation)
    assert torch.equal(causal_window_mask(keys[8:, None], keys[None, :], window), loop_mask(range(8, 12), range(12), window))



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



def test_flex_kernel_refuses_dropout():
    q = k = v = torch.randn(1, 2, 16, 8)
    with pytest.raises(ConfigError, match="dropout"):
        attention.causal_attention(q, k, v, window=4, impl="flex", dropout_p=0.1)
    model = tiny_model(window=4, dropout=0.1).train()
    model.set_attention_impl("flex")
    with pytest.raises(ConfigError, match="dropout"):
        model(torch.randint(0, 64, (1, 16)))

