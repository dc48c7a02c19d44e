"""
The GPT-2 model against transformers' GPT2LMHeadModel, the independent reference: parameter count,
checkpoint loading (logits and greedy text), block_size cropping, MHA -> GQA conversion, config
validation and the training helpers, and a training forward and backward under CPU bf16 autocast against fp32.

The checkpoints are random transformers models saved locally (no network), tokenized with the real
GPT-2 BPE files from ../shared.
"""

import os
import shutil

import pytest
import torch

from helpers import SHARED, tiny_model
from model import GPT, GPTConfig, load_model_state
from hf_bridge import gpt_from_hf
from common import estimate_mfu

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast  # noqa: E402

BPE = os.path.join(SHARED, "data", "gpt2_bpe")
PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak."
TINY = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)


def hf_config(**kw):
    # eager attention: the plainest of transformers' GPT-2 code paths; no dropout anywhere
    return GPT2Config(**kw, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")


def randomize_(hf_model, seed, matrices=True):
    """Random values everywhere (HF's init leaves biases at 0 and LayerNorms at 1, which would hide
    a mis-mapped bias or gain). matrices=False keeps HF's init for >=2-D tensors (the big model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if p.dim() >= 2 and not matrices:
                continue
            noise = torch.randn(p.shape, generator=g)
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_((0.1 if p.dim() >= 2 else 0.05) * noise)


def save_checkpoint(hf_model, folder):
    """save_pretrained plus the real GPT-2 tokenizer files, like a checkpoint from the hub."""
    os.makedirs(folder, exist_ok=True)
    hf_model.save_pretrained(folder)
    shutil.copy(os.path.join(BPE, "encoder.json"), os.path.join(folder, "vocab.json"))
    shutil.copy(os.path.join(BPE, "vocab.bpe"), os.path.join(folder, "merges.txt"))
    return str(folder)


def prompt_ids(folder, text=PROMPT):
    tok = GPT2TokenizerFast.from_pretrained(folder)
    ids = tok(text)["input_ids"]
    assert len(ids) > 5 and max(ids) > 255, "the prompt should be real BPE tokens, not bytes"
    return torch.tensor([ids])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hf_config(**TINY)).eval()
    randomize_(hf, seed=1)
    folder = save_checkpoint(hf, tmp_path_factory.mktemp("tiny_gpt2"))
    return folder, hf


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


def our_logits(model, idx):
    model.eval()
    with torch.no_grad():
        return model(idx)[0]


# -----------------------------------------------------------------------------
# size and checkpoint parity

def test_gpt2_small_parameter_count():
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    assert model.get_num_params() == 124_439_808
    # the position table is the only thing non_embedding leaves out
    assert model.get_num_params(non_embedding=True) == 124_439_808 - 1024 * 768


def test_initialisation_is_gpt2s():
    """GPT-2's init: N(0, 0.02) for the matrices and embeddings, the projections into the residual stream scaled
    down by 1/sqrt(2 * n_layer) (two per block), zero biases, unit LayerNorm gains."""
    torch.manual_seed(0)
    n_layer = 8
    model = GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=n_layer, n_head=4, n_embd=128))
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(0.02 / (2 * n_layer) ** 0.5, rel=0.05), name
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif "ln_" in name and name.endswith("weight"):
            assert torch.all(p == 1), name
        else:
            assert torch.all(p == 0), name


def test_tokenizer_files_are_real_gpt2(tiny_checkpoint):
    # the HF tokenizer built from ../shared's files and tiktoken's gpt2 agree on the prompt
    tiktoken = pytest.importorskip("tiktoken")
    folder, _ = tiny_checkpoint
    assert prompt_ids(folder)[0].tolist() == tiktoken.get_encoding("gpt2").encode(PROMPT)


def test_tiny_checkpoint_logits_match_transformers(tiny_checkpoint):
    folder, hf = tiny_checkpoint
    model = gpt_from_hf(folder)
    assert model.config.n_layer == 2 and model.config.block_size == 64 and model.config.vocab_size == 50257
    idx = prompt_ids(folder)
    ref = hf_logits(hf, idx)
    assert ref.std() > 0.1  # logits carry signal, so a 1e-4 match means something
    torch.testing.assert_close(our_logits(model, idx), ref, atol=1e-4, rtol=0)
    # a batch of two, the second a shifted copy
    batch = torch.cat([idx, idx.roll(1, dims=1)])
    torch.testing.assert_close(our_logits(model, batch), hf_logits(hf, batch), atol=1e-4, rtol=0)


def test_tiny_checkpoint_loss_matches_transformers(tiny_checkpoint):
    folder, hf = tiny_checkpoint
    model = gpt_from_hf(folder).eval()
    idx = prompt_ids(folder)
    with torch.no_grad():
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        ref = hf(idx, labels=idx).loss  # transformers shifts the labels itself
    assert abs(loss.item() - ref.item()) < 1e-4


def greedy_hf(hf, idx, steps):
    with torch.no_grad():
        for _ in range(steps):
            nxt = hf(idx).logits[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], dim=1)
    return idx


def test_tiny_checkpoint_greedy_continuation_matches_transformers(tiny_checkpoint):
    folder, hf = tiny_checkpoint
    model = gpt_from_hf(folder).eval()
    idx = prompt_ids(folder)
    ref = greedy_hf(hf, idx, 20)
    for use_cache in (True, False):
        ours = model.generate(idx, 20, temperature=0, use_cache=use_cache)
        assert ours.tolist() == ref.tolist()
    assert len(set(ref[0, idx.shape[1]:].tolist())) > 1  # not a degenerate single-token repeat


@pytest.mark.slow  # a 124M-parameter model built, saved, loaded and decoded on CPU: ~30 s
def test_gpt2_small_shape_checkpoint_matches_transformers(tmp_path):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hf_config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)).eval()
    randomize_(hf, seed=2, matrices=False)
    folder = save_checkpoint(hf, tmp_path / "gpt2_small")
    model = gpt_from_hf(folder)
    assert model.get_num_params() == 124_439_808
    idx = prompt_ids(folder)
    torch.testing.assert_close(our_logits(model, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)
    ours = model.generate(idx, 20, temperature=0)
    assert ours.tolist() == greedy_hf(hf, idx, 20).tolist()


# -----------------------------------------------------------------------------
# from_pretrained errors and overrides

def test_from_pretrained_offline_hub_name_says_pass_a_directory():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        from huggingface_hub import try_to_load_from_cache
        if isinstance(try_to_load_from_cache("gpt2", "config.json"), str):
            pytest.skip("gpt2 is in this machine's hub cache, so offline loading would succeed")
    except ImportError:
        pass
    with pytest.raises(OSError) as info:
        gpt_from_hf("gpt2")
    message = str(info.value)
    assert "\n" not in message
    assert "gpt2" in message and "directory" in message


def test_from_pretrained_missing_directory_is_oserror(tmp_path):
    with pytest.raises(OSError, match="directory"):
        gpt_from_hf(str(tmp_path / "no_such_checkpoint"))


def test_from_pretrained_rejects_larger_block_size(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    with pytest.raises(ValueError, match="block_size"):
        gpt_from_hf(folder, override_args=dict(block_size=65))


def test_from_pretrained_rejects_unknown_override(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    with pytest.raises(ValueError, match="n_layer"):
        gpt_from_hf(folder, override_args=dict(n_layer=3))


def test_from_pretrained_smaller_block_size_crops_wpe(tiny_checkpoint):
    folder, hf = tiny_checkpoint
    model = gpt_from_hf(folder, override_args=dict(block_size=16))
    assert model.config.block_size == 16
    assert model.transformer.wpe.weight.shape == (16, 32)
    torch.testing.assert_close(model.transformer.wpe.weight, hf.transformer.wpe.weight[:16])
    idx = prompt_ids(folder)
    assert idx.shape[1] <= 16
    torch.testing.assert_close(our_logits(model, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)
    full = torch.arange(16)[None] * 997  # a full 16-token block too
    torch.testing.assert_close(our_logits(model, full), hf_logits(hf, full), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


# -----------------------------------------------------------------------------
# MHA -> GQA conversion

def c_attn_kv_columns(C, head_dim, head, which):
    """Columns of the Conv1D c_attn weight (C, 3C) of one head of k (which=1) or v (which=2)."""
    start = which * C + head * head_dim
    return slice(start, start + head_dim)


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_gqa_conversion_exact_when_heads_are_shared(tmp_path, n_kv_head):
    torch.manual_seed(0)
    cfg = dict(TINY)
    C, H = cfg["n_embd"], cfg["n_head"]
    hd, group = C // H, H // n_kv_head
    hf = GPT2LMHeadModel(hf_config(**cfg)).eval()
    randomize_(hf, seed=3)
    # make the key and value heads identical within each group of consecutive query heads
    with torch.no_grad():
        for block in hf.transformer.h:
            w, b = block.attn.c_attn.weight, block.attn.c_attn.bias
            assert w.shape == (C, 3 * C)
            for which in (1, 2):
                for h in range(H):
                    first = (h // group) * group
                    w[:, c_attn_kv_columns(C, hd, h, which)] = w[:, c_attn_kv_columns(C, hd, first, which)]
                    b[c_attn_kv_columns(C, hd, h, which)] = b[c_attn_kv_columns(C, hd, first, which)]
    folder = save_checkpoint(hf, tmp_path / "shared_heads")
    model = gpt_from_hf(folder, override_args=dict(n_kv_head=n_kv_head))
    assert model.config.n_kv_head == n_kv_head
    assert model.transformer.h[0].attn.c_attn.weight.shape == ((H + 2 * n_kv_head) * hd, C)
    idx = prompt_ids(folder)
    torch.testing.assert_close(our_logits(model, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)


def test_gqa_conversion_is_group_mean(tiny_checkpoint):
    folder, hf = tiny_checkpoint
    C, H, n_kv = 32, 4, 2
    hd, group = C // H, H // n_kv
    model = gpt_from_hf(folder, override_args=dict(n_kv_head=n_kv))
    for layer, block in enumerate(hf.transformer.h):
        W = block.attn.c_attn.weight.detach()  # (C, 3C), Conv1D: out = x @ W + b
        b = block.attn.c_attn.bias.detach()
        ours_w = model.transformer.h[layer].attn.c_attn.weight.detach()  # nn.Linear: ((H + 2 n_kv) hd, C)
        ours_b = model.transformer.h[layer].attn.c_attn.bias.detach()
        torch.testing.assert_close(ours_w[:C], W[:, :C].t())
        torch.testing.assert_close(ours_b[:C], b[:C])
        for which in (1, 2):
            for j in range(n_kv):
                heads = range(j * group, (j + 1) * group)
                mean_w = sum(W[:, c_attn_kv_columns(C, hd, h, which)] for h in heads) / group
                mean_b = sum(b[c_attn_kv_columns(C, hd, h, which)] for h in heads) / group
                rows = slice(C + (which - 1) * n_kv * hd + j * hd, C + (which - 1) * n_kv * hd + (j + 1) * hd)
                torch.testing.assert_close(ours_w[rows], mean_w.t())
                torch.testing.assert_close(ours_b[rows], mean_b)
    # the converted model is a working GQA model, and not the same function as the original
    idx = prompt_ids(folder)
    logits = our_logits(model, idx)
    assert torch.isfinite(logits).all()
    assert (logits - hf_logits(hf, idx)).abs().max() > 1e-3


def test_n_kv_head_equal_to_n_head_loads_gpt2_unchanged(tiny_checkpoint):
    # nothing pooled: every tensor is the checkpoint's own (Conv1D weights transposed), and the logits are
    # transformers' GPT-2's
    folder, hf = tiny_checkpoint
    model = gpt_from_hf(folder, override_args=dict(n_kv_head=4))
    assert model.config.n_kv_head == 4
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    theirs = hf.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[name].t() if name.endswith(conv1d) else theirs[name]), name
    idx = prompt_ids(folder)
    torch.testing.assert_close(our_logits(model, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)


# -----------------------------------------------------------------------------
# GPTConfig validation

@pytest.mark.parametrize("kwargs, field", [
    (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_head=-2), "n_head"),
    (dict(n_embd=0), "n_embd"),
    (dict(block_size=0), "block_size"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(n_layer=2.0), "n_layer"),
    (dict(n_head=4, n_embd=32, n_kv_head=3), "n_kv_head"),
    (dict(n_head=4, n_embd=32, n_kv_head=0), "n_kv_head"),
    (dict(window=0), "window"),
    (dict(window=-3), "window"),
    (dict(n_layer=2, window=(3, 0)), "window"),
    (dict(n_layer=2, window=(3, None, 2)), "window"),
    (dict(n_layer=3, window=[4]), "window"),
    (dict(rope=True, n_head=4, n_embd=12), "rope"),  # head_dim 3
    (dict(rope=True, rope_theta=0.0, n_head=4, n_embd=32), "rope_theta"),
    (dict(dropout=1.0), "dropout"),
    (dict(qk_norm="yes"), "qk_norm"),
    (dict(mlp_act="relu"), "mlp_act"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**kwargs)


def test_config_valid_forms():
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=32, window=[3, None])
    assert cfg.window == (3, None) and cfg.n_kv_head == 4
    assert cfg.layer_window(0) == 3 and cfg.layer_window(1) is None
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert GPTConfig(n_head=4, n_embd=32, rope=True, window=1, n_kv_head=1).head_dim == 8


# -----------------------------------------------------------------------------
# training helpers

def test_configure_optimizers_decays_only_matrices_each_param_once():
    model = tiny_model()
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")
    decay = [g for g in opt.param_groups if g["weight_decay"] == 0.1]
    no_decay = [g for g in opt.param_groups if g["weight_decay"] == 0.0]
    assert len(decay) == 1 and len(no_decay) == 1
    assert all(p.dim() >= 2 for p in decay[0]["params"]) and decay[0]["params"]
    assert all(p.dim() < 2 for p in no_decay[0]["params"]) and no_decay[0]["params"]
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))  # nothing twice (lm_head is tied to wte)
    assert set(in_groups) == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay[0]["params"]}
    assert "transformer.wte.weight" in decayed and "transformer.h.0.attn.c_attn.weight" in decayed
    assert "transformer.h.0.attn.c_attn.bias" not in decayed and "transformer.ln_f.weight" not in decayed


def test_estimate_mfu_is_none_on_cpu():
    model = tiny_model()
    assert estimate_mfu(model, 32, 1e5, device="cpu") is None
    if not torch.cuda.is_available():
        assert estimate_mfu(model, 32, 1e5) is None


def test_flops_per_token_formula():
    model = tiny_model()
    L, H, D, T = 2, 4, 8, 32
    # N: every weight but the position table, counted once (lm_head is tied)
    N = sum(p.numel() for p in model.parameters()) - 32 * 32
    assert model.flops_per_token(T) == 6 * N + 12 * L * H * D * T
    # a window caps the context a query attends to; a global layer keeps T
    windowed = tiny_model(window=(4, None))
    assert windowed.flops_per_token(T) == 6 * N + 12 * H * D * (4 + T)


def test_load_model_state_names_mismatches():
    model = tiny_model()
    other = tiny_model(n_kv_head=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_model_state(model, other.state_dict())
    message = str(info.value)
    for layer in range(2):
        assert f"transformer.h.{layer}.attn.c_attn.weight" in message
        assert f"transformer.h.{layer}.attn.c_attn.bias" in message
    assert "transformer.wte.weight" not in message  # only the mismatched ones
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), "a failed load must not change the model"
    # missing and unexpected names are listed too
    sd = tiny_model().state_dict()
    sd.pop("transformer.ln_f.bias")
    sd["transformer.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        load_model_state(model, sd)
    assert "transformer.ln_f.bias" in str(info.value) and "transformer.extra.weight" in str(info.value)


def test_load_model_state_strips_compile_and_ddp_prefixes():
    model, source = tiny_model(), tiny_model(n_layer=2)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    load_model_state(model, {"_orig_mod." + k: v for k, v in source.state_dict().items()})
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


# -----------------------------------------------------------------------------
# CPU bf16 training

def loss_and_grads(model, idx, targets, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, loss = model(idx, targets)
    loss.backward()
    return loss.item(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("overrides", [dict(), dict(rope=True, n_kv_head=2, window=8)], ids=["gpt2", "rope-gqa-window"])
def test_cpu_bf16_autocast_training_matches_fp32(overrides):
    """A training forward and backward under CPU bf16 autocast (what the quick start runs on CPUs with native
    bf16) agree with fp32 to bf16's precision, for the loss and every parameter's gradient."""
    model = tiny_model(seed=3, scale=0.05, **overrides).train()
    g = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 64, (4, 32), generator=g), torch.randint(0, 64, (4, 32), generator=g)
    loss32, grads32 = loss_and_grads(model, idx, targets, autocast=False)
    loss16, grads16 = loss_and_grads(model, idx, targets, autocast=True)
    assert abs(loss16 - loss32) <= 2e-2 * abs(loss32), (loss16, loss32)
    for name, g32 in grads32.items():
        g16 = grads16[name].float()
        assert torch.isfinite(g16).all(), name
        relative = ((g16 - g32).norm() / g32.norm().clamp_min(1e-12)).item()
        assert relative < 5e-2, (name, relative)
    # and bf16 did run: the results are not fp32's bit for bit
    assert loss16 != loss32 or any(not torch.equal(grads16[n], grads32[n]) for n in grads32)

