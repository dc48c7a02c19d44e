"""
export_hf.py against transformers' own modules, the independent reference: for every variant that a
transformers architecture can hold, a checkpoint in train.py's format is exported, loaded with
AutoModelForCausalLM and AutoTokenizer (no remote code) and compared with our model (logits on
sequences longer than the window, greedy generation, tokenization); hf_bridge.gpt_from_hf must read the
folder back to the same logits, and read a Starcoder2 model made by transformers itself. The variants
no architecture holds are refused with one line and no folder.

The fast tests use tiny models with large random weights in every tensor (biases and LayerNorm gains
included), so that a mis-mapped tensor moves the logits far beyond the 1e-4 tolerance; the slow ones
train with train.py and go through the three command lines.
"""

import os
import sys
import json
import runpy

import pytest
import torch

from helpers import REPO, SEPARATOR, SHARED, TINY_TRAIN_ARGS, assert_user_error, logits_of, run_script, shakespeare_input, tiny_model

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, Starcoder2Config, Starcoder2ForCausalLM  # noqa: E402
from safetensors import safe_open  # noqa: E402

import export_hf  # noqa: E402
from errors import ConfigError  # noqa: E402
from hf_bridge import gpt_from_hf  # noqa: E402
from common import UserError, load_model, get_tokenizer  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402

BLOCK = 32  # tiny_model's block_size; the test sequences fill it, longer than every window below
TEXT = "ROMEO:\nWhat light through yonder window breaks?  It is the east,\n\nand Juliet is the sun!\n"

# name: (GPTConfig overrides, tokenizer, expected architecture)
VARIANTS = {
    "gpt2-bpe": (dict(vocab_size=50304), "bpe", "GPT2LMHeadModel"),  # 47 padding rows dropped
    "gpt2-char": (dict(vocab_size=65), "char", "GPT2LMHeadModel"),
    "gpt2-char-nobias": (dict(vocab_size=65, bias=False), "char", "GPT2LMHeadModel"),
    "rope": (dict(vocab_size=65, rope=True, rope_theta=500.0), "char", "Starcoder2ForCausalLM"),
    "rope-gqa-nobias": (dict(vocab_size=65, rope=True, n_kv_head=2, bias=False), "char", "Starcoder2ForCausalLM"),
    "rope-gqa-window": (dict(vocab_size=65, rope=True, n_kv_head=2, window=8), "char", "Starcoder2ForCausalLM"),
    "rope-mqa-window-per-layer": (dict(vocab_size=65, rope=True, n_kv_head=1, window=(6, 6)), "char",
                                  "Starcoder2ForCausalLM"),
    "gpt2-char-relu2": (dict(vocab_size=65, mlp_act="relu2"), "char", "GPT2LMHeadModel"),
    "rope-gqa-window-relu2": (dict(vocab_size=65, rope=True, n_kv_head=2, window=8, mlp_act="relu2"), "char",
                              "Starcoder2ForCausalLM"),
}
HF_ACTIVATIONS = {"gelu": "gelu_pytorch_tanh", "relu2": "relu2"}  # our mlp_act -> transformers' ACT2FN name


@pytest.fixture(scope="module")
def chars():
    with open(shakespeare_input(), encoding="utf-8") as f:
        return sorted(set(f.read()))


def write_run(out_dir, model, chars, best_val_loss=1.2345, iter_num=7):
    """A checkpoint as train.py writes it (checkpoint.save_checkpoint, the same keys)."""
    os.makedirs(out_dir, exist_ok=True)
    save_checkpoint(dict(model=model.state_dict(), model_args=model.config.to_dict(), iter_num=iter_num,
                         best_val_loss=best_val_loss, chars=chars,
                         config=dict(dataset="shakespeare_char", learning_rate=1e-3, max_iters=iter_num)),
                    os.path.join(out_dir, "ckpt.pt"))
    return str(out_dir)


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory, chars):
    """(name, our model, folder, character list or None, number of tokens) of one exported variant."""
    overrides, vocabulary, _ = VARIANTS[request.param]
    model = tiny_model(seed=len(request.param), **overrides)
    vocab_chars = chars if vocabulary == "char" else None
    out_dir = write_run(tmp_path_factory.mktemp(request.param) / "run", model, vocab_chars)
    folder = os.path.join(out_dir, "hf")
    export_hf.export(out_dir, folder)
    return request.param, model, folder, vocab_chars, 65 if vocab_chars else 50257


def sequences(n_tokens, batch=2, seed=0):
    """Random token ids filling the block (longer than every window here)."""
    return torch.randint(0, n_tokens, (batch, BLOCK), generator=torch.Generator().manual_seed(seed))


def load_hf(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


# -----------------------------------------------------------------------------
# each exportable variant

def test_folder_architecture_and_tied_weights(exported):
    name, model, folder, _, n_tokens = exported
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == [VARIANTS[name][2]]
    assert config["vocab_size"] == n_tokens and config["tie_word_embeddings"] is True
    for file in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert os.path.isfile(os.path.join(folder, file)), file
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        embedding = "transformer.wte.weight" if config["model_type"] == "gpt2" else "model.embed_tokens.weight"
        assert f.get_tensor(embedding).dtype == torch.float32
        assert f.get_tensor(embedding).shape == (n_tokens, model.config.n_embd)
    assert "lm_head.weight" not in keys  # tied: stored once, as transformers writes it
    if config["model_type"] == "starcoder2":
        assert config["num_key_value_heads"] == model.config.n_kv_head
        assert config["sliding_window"] == model.config.layer_window(0)
        assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == model.config.rope_theta
        assert config["use_bias"] is model.config.bias and config["hidden_act"] == HF_ACTIVATIONS[model.config.mlp_act]
    else:
        assert config["activation_function"] == HF_ACTIVATIONS[model.config.mlp_act]


def test_logits_match_transformers(exported):
    name, model, folder, _, n_tokens = exported
    hf = load_hf(folder)
    assert type(hf).__name__ == VARIANTS[name][2]
    idx = sequences(n_tokens)
    ours = logits_of(model, idx)[..., :n_tokens]
    assert ours.std() > 1.0  # weights large enough that a wrong mapping shows
    torch.testing.assert_close(logits_of(hf, idx), ours, atol=1e-4, rtol=0)


def test_eager_attention_matches_too(exported):
    """The eager path builds the (sliding-window) mask itself: it must agree as well."""
    _, model, folder, _, n_tokens = exported
    hf = load_hf(folder, attn_implementation="eager")
    idx = sequences(n_tokens, seed=1)
    torch.testing.assert_close(logits_of(hf, idx), logits_of(model, idx)[..., :n_tokens], atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(exported):
    _, model, folder, _, n_tokens = exported
    hf = load_hf(folder)
    prompt = sequences(n_tokens, batch=4, seed=2)[:, :5]
    ours = model.generate(prompt, BLOCK - 5, temperature=0)  # 32 positions: past every window
    theirs = hf.generate(prompt, max_new_tokens=BLOCK - 5, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(theirs, ours)
    assert max(len(set(row[5:].tolist())) for row in ours) > 3  # real continuations, not one token repeated


def test_tokenizer_encodes_and_decodes_as_training(exported):
    _, _, folder, chars, n_tokens = exported
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encode, decode, _ = get_tokenizer(chars)
    with open(shakespeare_input(), encoding="utf-8") as f:
        text = f.read()[:20000] + TEXT
    ids = tokenizer(text)["input_ids"]
    assert ids == encode(text)
    assert tokenizer.decode(ids) == decode(ids) == text
    assert len(tokenizer) == n_tokens
    if chars is None:
        special = "a<|endoftext|>b \t\r\n 12345 naïve 你好"
        assert tokenizer(special)["input_ids"] == encode(special)
        assert tokenizer.decode(encode(special)) == special
        assert tokenizer.eos_token_id == 50256


def test_from_pretrained_reads_the_export_back(exported):
    _, model, folder, chars, n_tokens = exported
    back = gpt_from_hf(folder).eval()
    cfg, ours = back.config, model.config
    assert (cfg.rope, cfg.rope_theta if cfg.rope else None, cfg.n_kv_head, cfg.window, cfg.vocab_size, cfg.mlp_act) == \
           (ours.rope, ours.rope_theta if ours.rope else None, ours.n_kv_head, ours.layer_window(0), n_tokens, ours.mlp_act)
    idx = sequences(n_tokens, seed=3)
    torch.testing.assert_close(logits_of(back, idx), logits_of(model, idx)[..., :n_tokens], atol=1e-5, rtol=0)
    assert load_model(folder).chars == chars  # sample.py and train.py get the character list too


def test_model_card(exported):
    name, model, folder, _, _ = exported
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as f:
        card = f.read()
    assert VARIANTS[name][2] in card and "1.2345" in card and "| iterations | 7 |" in card
    assert '"learning_rate": 0.001' in card and '"dataset": "shakespeare_char"' in card
    assert f"{model.get_num_params():,}" in card


# -----------------------------------------------------------------------------
# GPT-2's tokenizer files, against OpenAI's own (../shared has them)

def test_gpt2_tokenizer_files_are_openais(tmp_path):
    export_hf.write_gpt2_tokenizer(str(tmp_path), 1024)
    bpe = os.path.join(SHARED, "data", "gpt2_bpe")
    with open(tmp_path / "vocab.json", encoding="utf-8") as f, open(os.path.join(bpe, "encoder.json"), encoding="utf-8") as g:
        assert json.load(f) == json.load(g)
    with open(tmp_path / "merges.txt", encoding="utf-8") as f, open(os.path.join(bpe, "vocab.bpe"), encoding="utf-8") as g:
        assert f.read() == g.read()


# -----------------------------------------------------------------------------
# bfloat16, the destination, user errors

def test_bfloat16_export_is_the_rounded_model(tmp_path, chars):
    model = tiny_model(seed=5, vocab_size=65, rope=True, n_kv_head=2, window=8)
    out_dir = write_run(tmp_path / "run", model, chars)
    export_hf.export(out_dir, str(tmp_path / "bf16"), dtype="bfloat16")
    with open(tmp_path / "bf16" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        stored = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert stored == {torch.bfloat16}
    rounded = bf16_rounded(model)
    idx = sequences(65)
    torch.testing.assert_close(logits_of(load_hf(str(tmp_path / "bf16")), idx), logits_of(rounded, idx), atol=1e-4, rtol=0)
    assert (logits_of(rounded, idx) - logits_of(model, idx)).abs().max() > 1e-3  # rounding is visible: the test can fail
    # read back by our own loader: the rounded weights, exactly
    back = gpt_from_hf(str(tmp_path / "bf16")).eval()
    for name, tensor in back.state_dict().items():
        torch.testing.assert_close(tensor.float(), rounded.state_dict()[name], atol=0, rtol=0, msg=name)


def bf16_rounded(model):
    """A copy of model whose every weight is rounded to bfloat16 (kept in float32)."""
    import copy
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return rounded


@pytest.mark.slow  # sample.py imports transformers: ~20 s on 2 busy cores
def test_sample_from_bfloat16_export(tmp_path, chars):
    """sample.py on a bf16 folder prints what the bf16-rounded model generates greedily."""
    model = tiny_model(seed=12, vocab_size=65, rope=True, n_kv_head=2, window=8)
    folder = str(tmp_path / "bf16")
    export_hf.export(write_run(tmp_path / "run", model, chars), folder, dtype="bfloat16")
    prompt, n_new = "ROMEO:\n", BLOCK - 7
    stoi = {c: i for i, c in enumerate(chars)}
    with torch.no_grad():
        expected = bf16_rounded(model).generate(torch.tensor([[stoi[c] for c in prompt]]), n_new, temperature=0)
    assert sample_greedy([f"--init_from={folder}"], prompt, n_new) == "".join(chars[i] for i in expected[0, len(prompt):].tolist())


def test_destination_rules(tmp_path, chars):
    out_dir = write_run(tmp_path / "run", tiny_model(seed=6, vocab_size=65), chars)
    folder = str(tmp_path / "hf")
    export_hf.export(out_dir, folder)
    with pytest.raises(UserError, match="overwrite"):
        export_hf.export(out_dir, folder)
    export_hf.export(out_dir, folder, overwrite=True)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []  # no staging folder left behind
    with pytest.raises(UserError, match="not an earlier export"):
        export_hf.export(out_dir, out_dir, overwrite=True)  # never replaces a training run
    assert os.path.isfile(os.path.join(out_dir, "ckpt.pt"))
    with pytest.raises(UserError, match="dtype"):
        export_hf.export(out_dir, str(tmp_path / "fp16"), dtype="float16")
    assert not os.path.exists(tmp_path / "fp16")



def write_best_and_last(out_dir, chars):
    """A run whose best.pt (step 4) and ckpt.pt (step 9, written at a stop) hold different weights, as train.py
    writes them: ckpt.pt the state to continue from, best.pt the weights alone with their val_loss."""
    best, last = tiny_model(seed=11, vocab_size=65), tiny_model(seed=12, vocab_size=65)
    write_run(out_dir, last, chars, best_val_loss=1.25, iter_num=9)
    save_checkpoint(dict(model=best.state_dict(), model_args=best.config.to_dict(), iter_num=4, val_loss=1.25, chars=chars,
                         config=dict(dataset="shakespeare_char")), os.path.join(out_dir, "best.pt"))
    return best, last


def exported_weights(folder):
    return gpt_from_hf(str(folder)).state_dict()


def assert_weights_of(folder, model):
    for name, value in exported_weights(folder).items():
        torch.testing.assert_close(value, model.state_dict()[name], msg=name)


@pytest.mark.parametrize("which", [None, "best", "last"])
def test_the_command_line_exports_best_pt_unless_told(tmp_path, chars, monkeypatch, capsys, which):
    """export_hf.py with no --checkpoint exports best.pt (what the README promises when the run has one);
    --checkpoint=last the state to continue from. Run as the command line runs it, in a fresh namespace."""
    out_dir = str(tmp_path / "run")
    best, last = write_best_and_last(out_dir, chars)
    folder = tmp_path / "hf"
    monkeypatch.setattr(sys, "argv", ["export_hf.py", f"--out_dir={out_dir}", f"--hf_dir={folder}",
                                      *([f"--checkpoint={which}"] if which else [])])
    runpy.run_path(os.path.join(REPO, "export_hf.py"), run_name="__main__")
    said = capsys.readouterr().out
    if which == "last":
        assert "ckpt.pt (step 9" in said, said
        assert_weights_of(folder, last)
    else:
        assert "best.pt (step 4, val loss 1.2500)" in said, said
        assert_weights_of(folder, best)


def test_export_reads_best_pt_by_default(tmp_path, chars):
    out_dir = str(tmp_path / "run")
    best, _ = write_best_and_last(out_dir, chars)
    _, source = export_hf.export(out_dir, str(tmp_path / "hf"))
    assert source.startswith(f"read {os.path.join(out_dir, 'best.pt')} (step 4"), source
    assert_weights_of(tmp_path / "hf", best)


REFUSED = {
    "gqa-learned-positions": (dict(n_kv_head=2), ["n_kv_head=2", "rope=False", "Starcoder2ForCausalLM"]),
    "window-learned-positions": (dict(window=8), ["window=8", "rope=False", "GPT2LMHeadModel"]),
    "mixed-windows": (dict(rope=True, window=(8, None)), ["window=[8, None]", "sliding_window"]),
    "qk-norm": (dict(rope=True, qk_norm=True), ["qk_norm=True", "Qwen3", "with qk_norm=False export"]),
    "qk-norm-learned-positions": (dict(qk_norm=True, mlp_act="relu2"), ["qk_norm=True"]),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_combinations(tmp_path, chars, name):
    overrides, fragments = REFUSED[name]
    out_dir = write_run(tmp_path / "run", tiny_model(seed=7, vocab_size=65, **overrides), chars)
    with pytest.raises(UserError) as info:
        export_hf.export(out_dir, str(tmp_path / "hf"))
    message = str(info.value)
    assert "\n" not in message
    for fragment in ["cannot export", *fragments]:
        assert fragment in message, message
    assert os.listdir(tmp_path) == ["run"]  # no folder, nothing staged either


def test_refusal_on_the_command_line(tmp_path, chars):
    """What a user sees: exit code 1, the one line on stderr, no traceback, no folder."""
    out_dir = write_run(tmp_path / "run", tiny_model(seed=7, vocab_size=65, n_kv_head=2), chars)
    result = run_script("export_hf.py", f"--out_dir={out_dir}", f"--hf_dir={tmp_path / 'hf'}", timeout=300)
    assert_user_error(result, "cannot export n_kv_head=2", "GPT2LMHeadModel", "Starcoder2ForCausalLM")
    assert os.listdir(tmp_path) == ["run"]


def test_folder_without_character_list_is_refused(tmp_path, chars):
    out_dir = write_run(tmp_path / "run", tiny_model(seed=8, vocab_size=65, rope=True), chars)
    folder = tmp_path / "hf"
    export_hf.export(out_dir, str(folder))
    os.remove(folder / "tokenizer.json")
    assert gpt_from_hf(str(folder)).config.vocab_size == 65  # the model itself still loads
    with pytest.raises(UserError, match="cannot be decoded"):
        load_model(str(folder))


# -----------------------------------------------------------------------------
# Starcoder2 models made by transformers itself (as from the hub)

def starcoder2(seed, **kw):
    config = dict(vocab_size=96, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, sliding_window=6, use_bias=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, bos_token_id=None, eos_token_id=None)
    config.update(kw)
    torch.manual_seed(seed)
    model = Starcoder2ForCausalLM(Starcoder2Config(**config)).eval()
    with torch.no_grad():  # random everywhere: HF's init leaves biases at 0 and LayerNorms at 1
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "layernorm" in name or "norm.weight" in name
                    else 0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kw", [dict(), dict(use_bias=False), dict(sliding_window=None, num_key_value_heads=4)])
def test_starcoder2_from_transformers_loads_exactly(tmp_path, kw):
    hf = starcoder2(seed=9, **kw)
    hf.save_pretrained(tmp_path)
    model = gpt_from_hf(str(tmp_path)).eval()
    cfg = model.config
    assert cfg.rope and cfg.rope_theta == 100000.0 and cfg.n_kv_head == hf.config.num_key_value_heads
    assert cfg.window == hf.config.sliding_window and cfg.block_size == 64
    assert cfg.bias  # use_bias=False with nonzero LayerNorm biases: bias=True, zero Linear biases
    idx = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))  # 40 > window 6
    torch.testing.assert_close(logits_of(model, idx), logits_of(hf, idx), atol=1e-4, rtol=0)


def test_starcoder2_kv_heads_pool_and_block_size_grows(tmp_path):
    """n_kv_head below the checkpoint's pools its groups (exact when the heads of a group are equal);
    rotary models have no position table, so block_size may exceed max_position_embeddings."""
    hf = starcoder2(seed=10)
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):  # 2 kv heads of 8 dims: make them equal
                proj.weight[8:] = proj.weight[:8]
                proj.bias[8:] = proj.bias[:8]
    hf.save_pretrained(tmp_path)
    model = gpt_from_hf(str(tmp_path), dict(n_kv_head=1, block_size=128)).eval()
    assert model.config.n_kv_head == 1 and model.config.block_size == 128
    idx = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits_of(model, idx), logits_of(hf, idx), atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="n_kv_head=3"):
        gpt_from_hf(str(tmp_path), dict(n_kv_head=3))


@pytest.mark.parametrize("kw, field", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(norm_epsilon=1e-6), "norm_epsilon"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings"),
    (dict(intermediate_size=96), "intermediate_size"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}), "rope_parameters"),
])
def test_starcoder2_structures_we_cannot_hold_are_refused(tmp_path, kw, field):
    config = dict(vocab_size=96, hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, bos_token_id=None, eos_token_id=None)
    config.update(kw)
    Starcoder2Config(**config).save_pretrained(tmp_path)  # refused from config.json, before any weights
    with pytest.raises(ConfigError, match=field) as info:
        gpt_from_hf(str(tmp_path))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=field):
        load_model(str(tmp_path))


def test_gpt2_structures_we_cannot_hold_are_refused(tmp_path):
    from transformers import GPT2Config
    GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=1, n_head=4, activation_function="relu").save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="activation_function"):
        gpt_from_hf(str(tmp_path))


def test_other_architectures_are_refused(tmp_path):
    from transformers import LlamaConfig
    LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="llama"):
        gpt_from_hf(str(tmp_path))


# -----------------------------------------------------------------------------
# sample.py on an exported folder (the character list comes with it)

def sample_greedy(source_args, prompt, n_new):
    result = run_script("sample.py", *source_args, f"--start={prompt}", "--temperature=0", f"--max_new_tokens={n_new}",
                        "--num_samples=1", "--stream=False", "--device=cpu", "--dtype=float32", check=True, timeout=300)
    assert result.stdout.startswith(prompt) and result.stdout.endswith(f"\n{SEPARATOR}\n"), result.stdout
    return result.stdout[len(prompt):-len(SEPARATOR) - 2]


def hf_greedy(folder, prompt, n_new):
    tokenizer, hf = AutoTokenizer.from_pretrained(folder), load_hf(folder)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = hf.generate(ids, max_new_tokens=n_new, do_sample=False, attention_mask=torch.ones_like(ids))
    return tokenizer.decode(out[0, ids.shape[1]:])


@pytest.mark.slow  # sample.py imports transformers: ~20 s on 2 busy cores
def test_sample_from_exported_character_folder(tmp_path, chars):
    model = tiny_model(seed=11, vocab_size=65, rope=True, n_kv_head=2, window=8)
    out_dir = write_run(tmp_path / "run", model, chars)
    folder = os.path.join(out_dir, "hf")
    export_hf.export(out_dir, folder)
    prompt = "ROMEO:\n"
    text = sample_greedy([f"--init_from={folder}"], prompt, BLOCK - len(prompt))
    assert text == hf_greedy(folder, prompt, BLOCK - len(prompt))
    assert len(text) == BLOCK - len(prompt) and set(text) <= set(chars)


# -----------------------------------------------------------------------------
# end to end: train.py, export_hf.py, sample.py and train.py again, as a user runs them

E2E = {
    "gpt2-bpe": ["--dataset=shakespeare"],
    "gpt2-char": [],
    "rope": ["--rope=True", "--rope_theta=500.0"],
    "rope-gqa": ["--rope=True", "--n_kv_head=2"],
    "rope-gqa-window": ["--rope=True", "--n_kv_head=2", "--window=8"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(E2E))
def test_train_export_sample_end_to_end(data_root, tmp_path, name):
    out_dir, folder = tmp_path / "run", tmp_path / "hf"
    run_script(*TINY_TRAIN_ARGS, f"--data_root={data_root}", f"--out_dir={out_dir}", "--n_head=4", "--max_iters=6",
               "--learning_rate=1e-2", *E2E[name], check=True, timeout=300)
    result = run_script("export_hf.py", f"--out_dir={out_dir}", f"--hf_dir={folder}", check=True, timeout=300)
    assert str(folder) in result.stdout
    loaded = load_model("resume", str(out_dir))
    hf = load_hf(str(folder))
    n_tokens = hf.config.vocab_size
    idx = sequences(n_tokens)
    torch.testing.assert_close(logits_of(hf, idx), logits_of(loaded.model.eval(), idx)[..., :n_tokens], atol=1e-4, rtol=0)
    prompt = "ROMEO:\n"
    n_new = BLOCK - (7 if name != "gpt2-bpe" else 3)  # "ROMEO:\n" is 3 BPE tokens
    from_resume = sample_greedy(["--init_from=resume", f"--out_dir={out_dir}"], prompt, n_new)
    assert from_resume == hf_greedy(str(folder), prompt, n_new)
    assert sample_greedy([f"--init_from={folder}"], prompt, n_new) == from_resume
    # and train.py starts from the folder (a fresh run, the architecture taken from config.json)
    again = tmp_path / "again"
    run_script(*TINY_TRAIN_ARGS, f"--data_root={data_root}", f"--out_dir={again}", f"--init_from={folder}",
               "--max_iters=1", "--eval_interval=1",
               *(["--dataset=shakespeare"] if name == "gpt2-bpe" else []), check=True, timeout=300)
    args = torch.load(again / "ckpt.pt", weights_only=True)["model_args"]
    ours = loaded.model.config
    assert (args["rope"], args["n_kv_head"], args["window"], args["n_head"]) == (ours.rope, ours.n_kv_head, ours.window, 4)
