"""
What the scripts share and that is not the model: user-facing errors and range checks (errors.py, taken from
here), choosing the device and dtype, the GPU peak-FLOPs table, the model loaders (a new model, a trained
checkpoint through checkpoint.py, a GPT-2 name or a Hugging Face folder; load_model picks by --init_from), and
the tokenizer.
"""

import os
import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

import torch

from model import GPT, GPTConfig, GPT2_NAMES
from hf_bridge import gpt_from_hf
from errors import UserError, ConfigError, run_main, range_check  # noqa: F401  (every script takes them from here)
from checkpoint import LoadedModel, load_trained, is_character_vocabulary


# -----------------------------------------------------------------------------
# device and dtype

def pick_device(device: str = "auto") -> str:
    """'auto' picks cuda, then mps, then cpu; anything else is checked to exist."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind, colon, index = device.partition(":")
    if kind not in ("cuda", "mps", "cpu") or (colon and not index.isdigit()):
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but CUDA is not available here; use --device=auto or --device=cpu")
    if kind == "cuda" and colon and int(index) >= torch.cuda.device_count():
        raise UserError(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UserError(f"device={device!r} but MPS is not available here; use --device=auto or --device=cpu")
    return device


def pick_dtype(dtype: str, device: str) -> str:
    """'auto': bfloat16 where the GPU supports it, float16 (with a GradScaler) on older GPUs, float32 on CPU and MPS."""
    kind = device.split(":")[0]
    if dtype == "auto":
        if kind == "cuda":
            return "bfloat16" if cuda_has_native_bf16(device) else "float16"
        return "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if dtype == "float16" and kind == "cpu":
        raise UserError("dtype=float16 is not supported on CPU; use float32 or bfloat16")
    return dtype


def cuda_has_native_bf16(device: str = "cuda") -> bool:
    """bfloat16 tensor cores arrived with Ampere (compute capability 8.0). torch.cuda.is_bf16_supported()
    also answers True on a T4 or V100 (7.x), where bf16 is emulated and far slower than float16."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def autocast_context(device: str, dtype: str) -> AbstractContextManager:
    """Mixed precision for the forward pass; float32 needs none."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


# -----------------------------------------------------------------------------
# model FLOPs utilisation

# Dense tensor-core peaks (FLOP/s) in the precision training uses there: bf16, or fp16 on the cards that
# have no bf16 (V100, T4), from the vendors' data sheets. MFU against the wrong peak is meaningless, so an
# unknown device reports no MFU rather than a guess.
# Order rule: the first entry whose name is in the device's name wins, so a name comes before every
# shorter name it contains (GH200 before H200, H100 PCIe before H100, L40S before L40 before L4).
PEAK_TRAINING_FLOPS = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("A6000", 155e12),
    ("V100", 125e12),  # fp16
    ("T4", 65e12),  # fp16
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]


def device_peak_flops(device: str | torch.device | None = None) -> float | None:
    """bf16 dense peak of a CUDA device (fp16 for pre-bf16 cards), or None for CPUs, MPS and unknown GPUs."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_TRAINING_FLOPS:
        if key in name:
            return flops
    return None


def estimate_mfu(model: GPT, seq_len: int, tokens_per_second: float, device: str | None = None) -> float | None:
    """Model FLOPs utilisation of `model` against the dense peak of the device in use; None when unknown."""
    peak = device_peak_flops(device)
    if peak is None:
        return None
    return model.flops_per_token(seq_len) * tokens_per_second / peak


# -----------------------------------------------------------------------------
# the one road from a source to a ready model

def is_pretrained_source(init_from: str) -> bool:
    """A GPT-2 name ('gpt2', ...) or a local folder in the Hugging Face format."""
    return init_from in GPT2_NAMES or os.path.isdir(init_from)


def hf_folder_chars(folder: str) -> list[str] | None:
    """The character vocabulary of a Hugging Face folder whose tokenizer.json is a character list, as
    export_hf.py writes for a character-level model: a BPE model with no merges, no normalizer, no
    pre-tokenizer and no added tokens (so each character is one token), decoded by Fuse (joined as is).
    None for anything else (GPT-2's BPE). Read as JSON: nothing in the folder runs."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            tokenizer = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({type(e).__name__}); restore it or export the model again") from None
    bpe = tokenizer.get("model") if isinstance(tokenizer, dict) else None
    if not isinstance(bpe, dict) or not isinstance(tokenizer.get("decoder"), dict):
        return None
    vocab = bpe.get("vocab")
    if (bpe.get("type") != "BPE" or bpe.get("merges") or not isinstance(vocab, dict) or not vocab
            or tokenizer.get("normalizer") or tokenizer.get("pre_tokenizer") or tokenizer.get("added_tokens")
            or tokenizer["decoder"].get("type") != "Fuse"):
        return None
    if not all(isinstance(i, int) for i in vocab.values()):
        return None
    chars = sorted(vocab, key=vocab.get)
    if any(len(ch) != 1 for ch in chars) or [vocab[ch] for ch in chars] != list(range(len(chars))):
        return None
    return chars


def new_model(model_args: dict) -> GPT:
    """GPT(GPTConfig(**model_args)), freshly initialised; settings that make no model are a UserError."""
    try:
        return GPT(GPTConfig(**model_args))
    except ConfigError as e:
        raise UserError(str(e)) from None


def load_pretrained(source: str, overrides: dict | None = None, need_decoding: bool = True) -> LoadedModel:
    """The GPT of a GPT-2 name or a Hugging Face folder (hf_bridge.gpt_from_hf), with `overrides` among
    GPTConfig.PRETRAINED_OVERRIDES, and the folder's character list when it has one."""
    try:
        model = gpt_from_hf(source, overrides)
    except (OSError, ConfigError) as e:
        raise UserError(str(e)) from None
    chars = hf_folder_chars(source) if os.path.isdir(source) else None
    if need_decoding and chars is None and is_character_vocabulary(model.config.vocab_size):
        raise UserError(f"{source} has a {model.config.vocab_size}-token vocabulary but its tokenizer.json is "
                        f"not a character list, so its tokens cannot be decoded")
    if chars is not None and len(chars) != model.config.vocab_size:
        raise UserError(f"{source}: its tokenizer has {len(chars)} characters but the model "
                        f"{model.config.vocab_size} token rows")
    return LoadedModel(model, None, chars)


def load_model(init_from: str, out_dir: str = "out", overrides: dict | None = None,
               need_decoding: bool = True, which: str = "auto") -> LoadedModel:
    """
    The model a script's --init_from names, on the CPU in fp32 (move it where it runs): 'resume' reads
    out_dir's checkpoint `which` (load_trained: best.pt when present, else ckpt.pt), a GPT-2 name or a
    folder in the Hugging Face format goes through load_pretrained. A source that does not exist, is
    damaged or does not fit is a UserError.
    """
    if init_from == "resume":
        return load_trained(out_dir, need_decoding=need_decoding, which=which)
    if is_pretrained_source(init_from):
        return load_pretrained(init_from, overrides, need_decoding)
    raise UserError(f"unknown init_from {init_from!r}; use resume, {', '.join(GPT2_NAMES)} "
                    f"or a local folder in the Hugging Face format")


# -----------------------------------------------------------------------------
# tokenizers

def read_char_vocab(meta_path: str) -> tuple[int, list[str] | None]:
    """(vocab_size, chars) from a character data set's meta.json: chars maps token id -> character, or is
    None for a meta.json that holds only the vocabulary size (no itos, or an empty one). A file that is
    not such a JSON object (damaged, cut short, another file) is a UserError."""
    def damaged(why):
        return UserError(f"{meta_path} is not a valid character vocabulary ({why}); "
                         f"write it again with the data set's prepare.py")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise damaged(f"not JSON: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read {meta_path}: {e.strerror or e}") from None
    if not isinstance(meta, dict):
        raise damaged(f"a JSON {type(meta).__name__}, not an object")
    vocab_size = meta.get("vocab_size")
    if type(vocab_size) is not int or vocab_size < 1:
        raise damaged(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
    itos = meta.get("itos")
    if itos is None or itos == {}:
        return vocab_size, None
    if not isinstance(itos, dict) or set(itos) != {str(i) for i in range(vocab_size)}:
        raise damaged(f"itos must map every token id 0..{vocab_size - 1} to its character")
    chars = [itos[str(i)] for i in range(vocab_size)]
    bad = next((i for i, ch in enumerate(chars) if not isinstance(ch, str) or len(ch) != 1), None)
    if bad is not None:
        raise damaged(f"itos[{bad}] is {chars[bad]!r}, not one character")
    if len(set(chars)) != vocab_size:
        raise damaged("itos maps two token ids to the same character")
    return vocab_size, chars


class Tokenizer(NamedTuple):
    """encode: text -> token ids; decode: token ids -> text; start_ids begin a sample that has no prompt."""
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    start_ids: list[int]


def get_tokenizer(chars: list[str] | None = None) -> Tokenizer:
    """A character vocabulary's (a list: token id -> character) when given, GPT-2 BPE's otherwise.
    A sample with no prompt starts from <|endoftext|> with BPE, and cannot start with characters."""
    if chars is not None:
        stoi = {ch: i for i, ch in enumerate(chars)}
        def encode(text):
            unknown = sorted(set(ch for ch in text if ch not in stoi))
            if unknown:
                raise UserError(f"characters {''.join(unknown)!r} are not in the model's vocabulary of {len(chars)} characters")
            return [stoi[ch] for ch in text]
        return Tokenizer(encode, lambda ids: "".join(chars[i] for i in ids), [])
    enc = gpt2_encoding()
    return Tokenizer(lambda text: enc.encode(text, allowed_special={"<|endoftext|>"}), enc.decode, [enc.eot_token])


def gpt2_encoding():
    """tiktoken's GPT-2 BPE (also the source of the tokenizer files export_hf.py writes)."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ValueError) as e:  # the BPE files are downloaded on first use; offline that fails (requests' errors are OSErrors)
        raise UserError(f"could not load the GPT-2 tokenizer ({type(e).__name__}): tiktoken downloads it once; "
                        f"connect to the network once, or point TIKTOKEN_CACHE_DIR at a cache that has it") from None
