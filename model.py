"""
GPT-2 written from scratch, with three optional architectural changes:

- rope:      rotary position embedding on queries and keys instead of the learned position table
- n_kv_head: grouped-query attention (n_kv_head=1 is multi-query, n_kv_head=n_head is plain MHA)
- window:    causal sliding-window attention, for all layers or chosen per layer

and two from the recent speedruns (modded-nanogpt, nanochat):

- qk_norm:   queries and keys RMS-normalised per head (no learned scale) before the rotary embedding
- mlp_act:   the MLP's activation, GELU (GPT-2's tanh approximation) or ReLU² (relu(x)**2)

With all three off this is exactly GPT-2, with GPT-2's parameter names, so OpenAI's checkpoints
load one to one (hf_bridge.gpt_from_hf). How attention is computed is chosen in attention.py (attend);
generation, with its key/value cache and sampling, is in generation.py.

References:
1) OpenAI's GPT-2 TensorFlow code: https://github.com/openai/gpt-2/blob/master/src/model.py
2) RoFormer (rotary embeddings): https://arxiv.org/abs/2104.09864
3) GQA: https://arxiv.org/abs/2305.13245 ; Longformer / Mistral sliding windows: https://arxiv.org/abs/2004.05150
4) QK-norm: https://arxiv.org/abs/2302.05442 ; ReLU²: https://arxiv.org/abs/2109.08668 (Primer)
"""

import math
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, fields, asdict

import torch
import torch.nn as nn
from torch.nn import functional as F

import generation
from attention import ATTENTION_IMPLS, attend, rope_cos_sin
from errors import ConfigError


GPT2_VOCAB_SIZE = 50257  # GPT-2's BPE: 50,000 merges, 256 bytes and <|endoftext|>
MLP_ACTIVATIONS = ("gelu", "relu2")  # GPTConfig.mlp_act: GELU's tanh approximation (GPT-2's), relu(x)**2
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
# The model

class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx, self.dropout = config, layer_idx, config.dropout
        # queries, keys and values in one projection, as GPT-2: [q (n_head*hd) | k (n_kv*hd) | v (n_kv*hd)]
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, kv_cache=None, attn_impl="auto"):
        dropout_p = self.dropout if self.training else 0.0
        y = attend(self.c_attn(x), self.config, self.layer_idx, rope, kv_cache, attn_impl, dropout_p)
        return self.resid_dropout(self.c_proj(y))


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

    def forward(self, x, rope=None, kv_cache=None, attn_impl="auto"):
        x = x + self.attn(self.ln_1(x), rope, kv_cache, attn_impl)
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
        self.attn_impl = "auto"  # one of ATTENTION_IMPLS: how windowed layers attend (attention.attend)

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
        self.attn_impl = impl

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: generation.KVCache | None = None,
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
                x = torch.utils.checkpoint.checkpoint(block, x, rope, None, self.attn_impl, use_reentrant=False)
            else:
                x = block(x, rope, kv_cache, self.attn_impl)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)

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

    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, use_cache: bool = True, beyond_block_size: bool = False,
                        generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yields the next token (B, 1) max_new_tokens times, continuing idx (B, T): generation.generate_stream."""
        return generation.generate_stream(self, idx, max_new_tokens, temperature, top_k, top_p, use_cache,
                                          beyond_block_size, generator)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, beyond_block_size: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """idx (B, T) followed by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
        return generation.generate(self, idx, max_new_tokens, temperature, top_k, top_p, use_cache, beyond_block_size,
                                   generator)


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
