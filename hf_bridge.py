"""
The Hugging Face formats, both directions: `gpt_from_hf` reads GPT2LMHeadModel and
Starcoder2ForCausalLM checkpoints (for common.load_pretrained), and export_hf.py writes them through
`build_hf_model`. The config mapping, the name tables and the weight conversions live here once.

    learned positions, multi-head attention, no window          <-> GPT2LMHeadModel
    rotary, multi-head or grouped-query, one window or none     <-> Starcoder2ForCausalLM

Both take mlp_act='gelu' or 'relu2' (their activation setting). qk_norm has no home: the transformers
architectures with a per-head query/key norm pair it with RMSNorm blocks and gated MLPs (Qwen3, OLMo2) or
use a mean-subtracting LayerNorm on the heads (Persimmon, StableLM), so it is refused.
"""

import os

import torch

from model import GPT, GPTConfig
from errors import ConfigError

# nn.Linear weights that transformers' GPT-2 keeps in Conv1D modules, transposed
GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TANH_GELU_NAMES = ("gelu_pytorch_tanh", "gelu_new")  # transformers' names for our GELU, the tanh approximation
RELU2_NAME = "relu2"  # transformers' ACT2FN name of relu(x)**2, our mlp_act="relu2"
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which every LayerNorm of model.py uses
STARCODER2_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # our c_attn, stacked in this order
HF_CLASS_NAMES = {"gpt2": "GPT2LMHeadModel", "starcoder2": "Starcoder2ForCausalLM"}


def starcoder2_names(n_layer: int) -> dict[str, str]:
    """Our module names -> Starcoder2ForCausalLM's (each with .weight and .bias), all but c_attn,
    which is Starcoder2's STARCODER2_QKV stacked. lm_head is tied to the embedding in both."""
    names = {"transformer.wte": "model.embed_tokens", "transformer.ln_f": "model.norm"}
    for i in range(n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        names.update({ours + "ln_1": theirs + "input_layernorm", ours + "attn.c_proj": theirs + "self_attn.o_proj",
                      ours + "ln_2": theirs + "post_attention_layernorm", ours + "mlp.c_fc": theirs + "mlp.c_fc",
                      ours + "mlp.c_proj": theirs + "mlp.c_proj"})
    return names


def add_zero_biases(sd, names):
    """A zero bias beside every weight in `names` that has none: the same function as no bias."""
    for name, weight in list(sd.items()):
        bias = name.removesuffix(".weight") + ".bias"
        if name in names and name.endswith(".weight") and bias not in sd:
            sd[bias] = weight.new_zeros(weight.shape[0])
    return sd


# -----------------------------------------------------------------------------
# reading: a Hugging Face checkpoint -> GPTConfig and our state dict

def _mlp_act(hf_config, field):
    """Our mlp_act of a checkpoint's activation setting, after checking that we have it."""
    name = getattr(hf_config, field)
    _check_hf_field(hf_config, field, name in (*TANH_GELU_NAMES, RELU2_NAME), f"one of {(*TANH_GELU_NAMES, RELU2_NAME)}")
    return "relu2" if name == RELU2_NAME else "gelu"


def _hf_activation(config):
    return RELU2_NAME if config.mlp_act == "relu2" else TANH_GELU_NAMES[0]


def _check_hf_field(hf_config, field, ok, needed):
    if not ok:
        raise ConfigError(f"{hf_config.model_type} checkpoint has {field}={getattr(hf_config, field, None)!r}, but this GPT "
                          f"needs {needed}: no parameter mapping can hold that")


def _gpt2_config_args(hf_config):
    """GPTConfig arguments of a GPT2Config, after checking that its blocks are ours."""
    c = hf_config
    mlp_act = _mlp_act(c, "activation_function")
    _check_hf_field(c, "layer_norm_epsilon", c.layer_norm_epsilon == LAYER_NORM_EPS, LAYER_NORM_EPS)
    _check_hf_field(c, "n_inner", c.n_inner in (None, 4 * c.n_embd), f"None or 4 * n_embd = {4 * c.n_embd}")
    _check_hf_field(c, "scale_attn_weights", c.scale_attn_weights, True)
    _check_hf_field(c, "scale_attn_by_inverse_layer_idx", not c.scale_attn_by_inverse_layer_idx, False)
    _check_hf_field(c, "tie_word_embeddings", c.tie_word_embeddings, True)
    return dict(n_layer=c.n_layer, n_head=c.n_head, n_kv_head=c.n_head, n_embd=c.n_embd,
                block_size=c.n_positions, vocab_size=c.vocab_size, bias=True, dropout=0.0, rope=False, mlp_act=mlp_act)


def _starcoder2_config_args(hf_config):
    """GPTConfig arguments of a Starcoder2Config, after checking that its blocks are ours (bias is
    settled once the weights are read)."""
    c = hf_config
    mlp_act = _mlp_act(c, "hidden_act")
    _check_hf_field(c, "norm_epsilon", c.norm_epsilon == LAYER_NORM_EPS, LAYER_NORM_EPS)
    _check_hf_field(c, "intermediate_size", c.intermediate_size == 4 * c.hidden_size,
                    f"4 * hidden_size = {4 * c.hidden_size}")
    _check_hf_field(c, "tie_word_embeddings", c.tie_word_embeddings, True)
    head_dim = getattr(c, "head_dim", None)
    _check_hf_field(c, "head_dim", head_dim in (None, c.hidden_size // c.num_attention_heads),
                    f"hidden_size / num_attention_heads = {c.hidden_size // c.num_attention_heads}")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    _check_hf_field(c, "rope_parameters", rope.get("rope_type", "default") == "default" and
                    rope.get("partial_rotary_factor", 1.0) == 1.0, "plain rotary embedding (rope_type 'default', no scaling)")
    return dict(n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_kv_head=c.num_key_value_heads,
                n_embd=c.hidden_size, block_size=c.max_position_embeddings, vocab_size=c.vocab_size,
                bias=True, dropout=0.0, rope=True, rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
                window=c.sliding_window, mlp_act=mlp_act)


def _gpt2_to_ours(hf_sd):
    return {name: (t.t() if name.endswith(GPT2_TRANSPOSED) else t) for name, t in hf_sd.items()}


def _starcoder2_to_ours(hf_sd, n_layer):
    """A Starcoder2ForCausalLM state dict under our names, with zero biases for the Linears of a
    use_bias=False checkpoint (the same function)."""
    sd = {}
    for ours, theirs in starcoder2_names(n_layer).items():
        for kind in ("weight", "bias"):
            if f"{theirs}.{kind}" in hf_sd:
                sd[f"{ours}.{kind}"] = hf_sd[f"{theirs}.{kind}"]
    for i in range(n_layer):
        for kind in ("weight", "bias"):
            parts = [hf_sd.get(f"model.layers.{i}.{proj}.{kind}") for proj in STARCODER2_QKV]
            if parts[0] is not None:
                sd[f"transformer.h.{i}.attn.c_attn.{kind}"] = torch.cat(parts, dim=0)
    return add_zero_biases(sd, [name for name in sd if name.endswith(GPT2_TRANSPOSED)])


def _pretrained_load_error(name_or_path, e):
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if os.path.isdir(name_or_path):  # a local folder: damaged or incomplete, and no network would help
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            reason = "no config.json in it"
        return OSError(f"could not load the Hugging Face folder {name_or_path!r} ({reason}); restore it from a "
                       f"backup or export it again with python export_hf.py")
    return OSError(f"could not load checkpoint {name_or_path!r} ({reason}). Without a network, save it on a machine "
                   f"that has one (GPT2LMHeadModel.from_pretrained('gpt2').save_pretrained('gpt2-local')) "
                   f"and pass that directory instead")


def _pool_kv_heads(weight, n_head, source_kv_head, n_kv_head, head_dim):
    """c_attn weight or bias [q | k | v] with source_kv_head key/value heads -> n_kv_head of them, each
    the mean of a group of consecutive heads (query head h keeps using kv head h // (n_head // n_kv_head))."""
    if n_kv_head == source_kv_head:
        return weight
    q, k, v = weight.split([n_head * head_dim, source_kv_head * head_dim, source_kv_head * head_dim], dim=0)
    group = source_kv_head // n_kv_head
    def pool(x):
        return x.reshape(n_kv_head, group, head_dim, *x.shape[1:]).mean(dim=1).reshape(n_kv_head * head_dim, *x.shape[1:])
    return torch.cat((q, pool(k), pool(v)), dim=0)


def gpt_from_hf(name_or_path: str, override_args: dict | None = None) -> GPT:
    """
    A GPT with the weights of OpenAI's GPT-2 ('gpt2', 'gpt2-medium', ...) or of a local Hugging Face folder
    in one of the two architectures above. Blocks that differ from ours (activation, norm epsilon, MLP width,
    untied embeddings, scaled rotary, ...) are a ConfigError that names the field. override_args may set
    dropout, block_size (smaller only with learned positions), window, or n_kv_head: fewer key/value heads
    are made by mean-pooling the heads of each group (Ainslie et al., 2023).
    """
    override_args = dict(override_args or {})
    allowed = set(GPTConfig.PRETRAINED_OVERRIDES)
    unknown = set(override_args) - allowed
    if unknown:
        raise ConfigError(f"from_pretrained can override only {sorted(allowed)}, not {sorted(unknown)}")
    from safetensors import SafetensorError
    from transformers import AutoConfig, GPT2LMHeadModel, Starcoder2ForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a progress bar per load is noise in logs and tests
    try:
        hf_config = AutoConfig.from_pretrained(name_or_path)  # small: check that it fits before loading weights
    except (OSError, ValueError) as e:  # no network, no such directory, no config.json, unknown model_type
        raise _pretrained_load_error(name_or_path, e) from None
    if hf_config.model_type not in HF_CLASS_NAMES:
        raise ConfigError(f"{name_or_path!r} is a {hf_config.model_type!r} model; from_pretrained reads gpt2 "
                          f"(GPT2LMHeadModel) and starcoder2 (Starcoder2ForCausalLM) checkpoints")
    is_gpt2 = hf_config.model_type == "gpt2"
    config_args = _gpt2_config_args(hf_config) if is_gpt2 else _starcoder2_config_args(hf_config)
    source_kv_head = config_args["n_kv_head"]
    if not config_args["rope"] and override_args.get("block_size", hf_config.n_positions) > hf_config.n_positions:
        raise ConfigError(f"block_size={override_args['block_size']} is larger than the {hf_config.n_positions} "
                          f"positions {name_or_path!r} was trained with")
    config_args.update(override_args)
    config = GPTConfig(**config_args)  # the settings are checked before the weights are read
    if source_kv_head % config.n_kv_head != 0:
        raise ConfigError(f"n_kv_head={config.n_kv_head} must divide the {source_kv_head} key/value heads "
                          f"of {name_or_path!r}")
    try:
        hf_sd = (GPT2LMHeadModel if is_gpt2 else Starcoder2ForCausalLM).from_pretrained(name_or_path).state_dict()
    except (OSError, ValueError, SafetensorError) as e:  # missing or damaged weight files
        raise _pretrained_load_error(name_or_path, e) from None

    if is_gpt2:
        source = _gpt2_to_ours(hf_sd)
    else:
        source = _starcoder2_to_ours(hf_sd, config.n_layer)
        # use_bias=False leaves Linears without biases but LayerNorms with them: our bias=False holds
        # that when the LayerNorm biases are zero (export_hf.py writes zeros), else bias=True with zeros
        if not hf_config.use_bias and not any(t.any() for name, t in source.items() if name.endswith(".bias")):
            config = GPTConfig(**{**config_args, "bias": False})
    model = GPT(config)
    with torch.no_grad():
        for name, target in model.state_dict().items():
            value = source["transformer.wte.weight" if name == "lm_head.weight" else name]  # tied
            if name == "transformer.wpe.weight":
                value = value[:config.block_size]
            if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
                value = _pool_kv_heads(value, config.n_head, source_kv_head, config.n_kv_head, config.head_dim)
            if value.shape != target.shape:
                raise ConfigError(f"shape mismatch for {name}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
            target.copy_(value)
    return model


# -----------------------------------------------------------------------------
# writing: our model -> a transformers model

def target_architecture(config: GPTConfig) -> str:
    """'gpt2' or 'starcoder2' for a GPTConfig; a ConfigError naming the setting no architecture can hold."""
    windows = config.window if isinstance(config.window, tuple) else (config.window,) * config.n_layer
    if config.qk_norm:
        raise ConfigError("cannot export qk_norm=True: no transformers architecture holds a per-head RMS norm of queries "
                          "and keys (without a learned scale) beside LayerNorm blocks and a plain MLP (Qwen3 and OLMo2 "
                          "have RMSNorm blocks and gated MLPs, Persimmon and StableLM a mean-subtracting LayerNorm on the "
                          "heads). Models trained with qk_norm=False export")
    if not config.rope:
        if config.n_kv_head != config.n_head:
            raise ConfigError(f"cannot export n_kv_head={config.n_kv_head} (grouped-query attention) with learned positions "
                              f"(rope=False): no transformers architecture holds both; GPT2LMHeadModel is multi-head only. "
                              f"Multi-head models with learned positions export as GPT2LMHeadModel, rope=True models "
                              f"(grouped-query or not) as Starcoder2ForCausalLM")
        if any(w is not None for w in windows):
            raise ConfigError(f"cannot export window={config.window} with learned positions (rope=False): GPT2LMHeadModel "
                              f"has no sliding window. Models with learned positions and no window export as "
                              f"GPT2LMHeadModel, rope=True models with one window for every layer as Starcoder2ForCausalLM")
        return "gpt2"
    if len(set(windows)) > 1:
        raise ConfigError(f"cannot export window={list(config.window)}: the layers differ, and Starcoder2ForCausalLM (the "
                          f"transformers architecture with our rotary LayerNorm-GELU blocks) has one sliding_window for "
                          f"all layers. The same window in every layer, or none, exports")
    return "starcoder2"


def common_window(config):
    """The one window of every layer (None: full causal attention)."""
    return config.layer_window(0)


def hf_config_of(arch, config, n_tokens, eos_id):
    """The transformers config of the same model. Dropout maps onto the same three places (embeddings,
    attention probabilities, each block's two residual branches); GPT-2's Conv1D needs no setting."""
    from transformers import GPT2Config, Starcoder2Config
    activation = _hf_activation(config)
    if arch == "gpt2":
        return GPT2Config(vocab_size=n_tokens, n_positions=config.block_size, n_embd=config.n_embd,
                          n_layer=config.n_layer, n_head=config.n_head, n_inner=None, activation_function=activation,
                          resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                          layer_norm_epsilon=LAYER_NORM_EPS, bos_token_id=eos_id, eos_token_id=eos_id,
                          tie_word_embeddings=True, architectures=[HF_CLASS_NAMES[arch]])
    # Starcoder2's sliding window counts the query itself, as ours does: key j is seen from query i
    # when i - window < j <= i (transformers' masking_utils.sliding_window_overlay), so W maps to W
    return Starcoder2Config(vocab_size=n_tokens, hidden_size=config.n_embd, intermediate_size=4 * config.n_embd,
                            num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                            num_key_value_heads=config.n_kv_head, hidden_act=activation,
                            max_position_embeddings=config.block_size, norm_epsilon=LAYER_NORM_EPS,
                            rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
                            sliding_window=common_window(config), use_bias=config.bias,
                            attention_dropout=config.dropout, residual_dropout=config.dropout,
                            embedding_dropout=config.dropout, bos_token_id=eos_id, eos_token_id=eos_id,
                            tie_word_embeddings=True, architectures=[HF_CLASS_NAMES[arch]])


def hf_state_dict(arch, model, n_tokens):
    """Our weights under the architecture's names, the embedding cut to the tokenizer's n_tokens rows
    (the padding rows of a 50304-row GPT-2 embedding are never a target, so never predicted).
    bias=False: GPT-2 has biases everywhere, Starcoder2 in its LayerNorms; zeros there are exact."""
    config = model.config
    sd = {name: t.detach() for name, t in model.state_dict().items()}
    sd["transformer.wte.weight"] = sd["transformer.wte.weight"][:n_tokens]
    if not config.bias:
        add_zero_biases(sd, [name for name in sd if "ln_" in name or name.endswith(GPT2_TRANSPOSED)])
    if arch == "gpt2":
        out = {name: (t.t() if name.endswith(GPT2_TRANSPOSED) else t) for name, t in sd.items()}
    else:
        out = {}
        for ours, theirs in starcoder2_names(config.n_layer).items():
            for kind in ("weight", "bias"):
                layer_norm = ours.endswith(("ln_1", "ln_2", "ln_f"))  # Starcoder2's LayerNorms always have biases
                if f"{ours}.{kind}" in sd and (config.bias or kind == "weight" or layer_norm):
                    out[f"{theirs}.{kind}"] = sd[f"{ours}.{kind}"]
        q_size, kv_size = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        for i in range(config.n_layer):
            for kind in ("weight", "bias") if config.bias else ("weight",):
                parts = sd[f"transformer.h.{i}.attn.c_attn.{kind}"].split([q_size, kv_size, kv_size], dim=0)
                for proj, part in zip(STARCODER2_QKV, parts):
                    out[f"model.layers.{i}.{proj}.{kind}"] = part
    out["lm_head.weight"] = out["transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"]
    return out


def build_hf_model(model, n_tokens, eos_id, torch_dtype):
    """(architecture, the transformers model holding `model`'s weights, in torch_dtype, eval mode)."""
    from transformers import GPT2LMHeadModel, Starcoder2ForCausalLM
    arch = target_architecture(model.config)
    hf_class = GPT2LMHeadModel if arch == "gpt2" else Starcoder2ForCausalLM
    hf_model = hf_class(hf_config_of(arch, model.config, n_tokens, eos_id))
    hf_model.load_state_dict(hf_state_dict(arch, model, n_tokens), strict=True)
    hf_model.tie_weights()
    return arch, hf_model.to(torch_dtype).eval()
