"""
Exports a model trained here (out_dir's best.pt, else ckpt.pt; --checkpoint=best|last picks) to the Hugging Face
format: a folder that transformers loads without trust_remote_code, GPT2LMHeadModel for learned positions and
Starcoder2ForCausalLM for rotary ones; what else is refused, and what the folder holds: docs/export.md.

    python export_hf.py --out_dir=out-shakespeare-char --hf_dir=shakespeare-char-hf
    python export_hf.py --out_dir=out --hf_dir=my-gpt --dtype=bfloat16
"""

import os
import sys
import json
import shutil

import torch

from model import GPT2_VOCAB_SIZE
from errors import ConfigError
from hf_bridge import HF_CLASS_NAMES, build_hf_model, common_window, target_architecture
from configurator import read_settings
from common import UserError, run_main, gpt2_encoding
from checkpoint import load_trained, checkpoint_path, describe_trained

# -----------------------------------------------------------------------------
out_dir = "out"  # the train.py run whose model is exported
checkpoint = "auto"  # 'auto' (best.pt when present, else ckpt.pt) | 'best' (best.pt) | 'last' (ckpt.pt)
hf_dir = ""  # the folder to write; "" means out_dir/hf
dtype = "float32"  # 'float32' (exact) | 'bfloat16' (half the size, for sharing)
overwrite = False  # replace an earlier export in hf_dir
# -----------------------------------------------------------------------------

# -----------------------------------------------------------------------------
# tokenizers

def gpt2_merges(ranks):
    """GPT-2's merges in order, recovered from tiktoken's ranks: the token of rank r is the merge of the
    two parts that byte-level BPE with only the ranks below r leaves of it (so merges.txt line r - 255)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
            _, i = min((r, i) for r, i in pairs if r is not None and r < rank)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def write_gpt2_tokenizer(folder, block_size):
    """GPT-2's tokenizer, built from tiktoken's encoding (the one training used; no download): the
    tokenizers backend of transformers' GPT2Tokenizer in tokenizer.json, and vocab.json and merges.txt
    for the readers that want OpenAI's two files."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    enc = gpt2_encoding()
    byte_to_char = bytes_to_unicode()  # GPT-2 writes each byte as a printable character in its files
    def text(token):
        return "".join(byte_to_char[b] for b in token)
    ranks = enc._mergeable_ranks  # bytes -> id; tiktoken's public API encodes, it does not list merges
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab.update(enc._special_tokens)  # <|endoftext|>: 50256
    assert len(vocab) == enc.n_vocab == GPT2_VOCAB_SIZE
    merges = [(text(a), text(b)) for a, b in gpt2_merges(ranks)]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split, then bytes
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    backend.save(os.path.join(folder, "tokenizer.json"))
    write_tokenizer_config(folder, "GPT2Tokenizer", block_size, bos_token="<|endoftext|>",
                           eos_token="<|endoftext|>", unk_token="<|endoftext|>", add_prefix_space=False)


def write_tokenizer_config(folder, tokenizer_class, block_size, **special):
    """tokenizer_config.json, written out rather than by save_pretrained so that every transformers
    version reads it the same. clean_up_tokenization_spaces=False: decoding must not touch spaces."""
    tokenizer_config = {"tokenizer_class": tokenizer_class, "clean_up_tokenization_spaces": False,
                        "model_max_length": block_size, **special}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)


def write_char_tokenizer(folder, chars, block_size):
    """A tokenizer that encodes each character as its id and decodes by joining, exactly as training
    did (newlines and spaces included): a BPE model with no merges and no pre-tokenizer, so the text
    is split into characters and nothing else, and a Fuse decoder. Characters outside the vocabulary
    are dropped (tokenizers has no error for them, and the model has no unknown token)."""
    from tokenizers import Tokenizer, decoders, models
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(chars)}, merges=[], fuse_unk=False))
    backend.decoder = decoders.Fuse()
    backend.save(os.path.join(folder, "tokenizer.json"))
    write_tokenizer_config(folder, "PreTrainedTokenizerFast", block_size)


# -----------------------------------------------------------------------------
# model card

def model_card(arch, model, checkpoint, chars, n_tokens, torch_dtype, name):
    cfg = model.config
    hf_name = HF_CLASS_NAMES[arch]
    best = checkpoint.get("best_val_loss")
    rows = [("architecture", f"`{hf_name}`"), ("parameters", f"{model.get_num_params():,} (ours, embedding counted once)"),
            ("layers, heads, width", f"{cfg.n_layer}, {cfg.n_head}, {cfg.n_embd}"),
            ("key/value heads", f"{cfg.n_kv_head}" + (" (grouped-query)" if cfg.n_kv_head != cfg.n_head else "")),
            ("positions", f"rotary, theta {cfg.rope_theta:g}" if cfg.rope else f"learned, {cfg.block_size}"),
            ("context trained on", str(cfg.block_size)),
            ("attention window", "none (full causal)" if common_window(cfg) is None
             else f"{common_window(cfg)} (each token sees itself and the {common_window(cfg) - 1} before it)"),
            ("biases", "yes" if cfg.bias else "no (exported as zeros where the format has them)"),
            ("vocabulary", f"{n_tokens} characters" if chars is not None else f"GPT-2 BPE, {n_tokens} tokens"
             + (f" (the {cfg.vocab_size - n_tokens} padding rows dropped)" if cfg.vocab_size > n_tokens else "")),
            ("weights", str(torch_dtype).removeprefix("torch.")),
            ("iterations", str(checkpoint.get("iter_num", "unknown"))),
            ("best validation loss", f"{best:.4f}" if isinstance(best, float) else "unknown")]
    training_settings = checkpoint.get("config")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "---", "",
             f"# {name}", "",
             (f"A GPT trained with this repository's `train.py` and exported by `export_hf.py` as `{hf_name}`, "
              f"which `transformers` loads without remote code."), "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f"tokenizer = AutoTokenizer.from_pretrained({name!r})",
             f"model = AutoModelForCausalLM.from_pretrained({name!r})", "```", ""]
    if chars is not None:
        lines += [("The tokenizer is the character list of the training data: one token per character, newlines "
                   "included; characters outside it are dropped."), ""]
    if training_settings:
        lines += ["## Training settings", "", "```json", json.dumps(training_settings, indent=1, sort_keys=True, default=str),
                  "```", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------

def check_destination(folder, overwrite):
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"hf_dir {folder!r} is a file; choose a folder")
    if os.path.isdir(folder) and os.listdir(folder):
        run_files = [checkpoint_path(folder, which) for which in ("last", "best")]
        if any(map(os.path.exists, run_files)) or not os.path.exists(os.path.join(folder, "config.json")):
            raise UserError(f"hf_dir {folder!r} holds files that are not an earlier export; choose an empty or new folder")
        if not overwrite:
            raise UserError(f"hf_dir {folder!r} already holds an export; pass --overwrite=True to replace it")


def write_top_level_rope_theta(folder: str, rope_theta: float) -> None:
    """transformers 5 writes rope_theta inside rope_parameters; earlier versions and other readers (serving
    engines) look for it at the top level of config.json and would silently use 10000 instead."""
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        hf_json = json.load(f)
    hf_json["rope_theta"] = float(rope_theta)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(hf_json, f, indent=2, sort_keys=True)


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export(out_dir: str, hf_dir: str, dtype: str = "float32", overwrite: bool = False, which: str = "auto") -> tuple[str, str]:
    """Write the Hugging Face folder of out_dir's checkpoint `which` (common.checkpoint_path) into hf_dir and
    return (the architecture, 'gpt2' or 'starcoder2'; which file was read, at which step). Every check
    comes before anything is written, and the folder is built aside and moved into place whole: a
    refusal or a crash leaves hf_dir as it was."""
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"unknown dtype {dtype!r}; use float32 (exact) or bfloat16 (half the size)")
    hf_dir = os.path.abspath(hf_dir)
    check_destination(hf_dir, overwrite)
    loaded = load_trained(out_dir, which=which)
    model, chars, checkpoint = loaded.model.eval(), loaded.chars, loaded.checkpoint
    try:
        target_architecture(model.config)  # refused before anything is written
    except ConfigError as e:
        raise UserError(str(e)) from None
    n_tokens = len(chars) if chars is not None else GPT2_VOCAB_SIZE
    if model.config.vocab_size < n_tokens:
        raise UserError(f"the model has {model.config.vocab_size} token rows but its tokenizer {n_tokens} tokens")
    eos_id = None if chars is not None else gpt2_encoding().eot_token
    torch_dtype = getattr(torch, dtype)

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    parent, name = os.path.split(hf_dir)
    staging = os.path.join(parent, f".{name}.partial-{os.getpid()}")  # same file system: the move is a rename
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(staging)
    except OSError as e:
        raise UserError(f"cannot write into {parent!r} ({e.strerror}); choose another --hf_dir") from None
    try:
        arch, hf_model = build_hf_model(model, n_tokens, eos_id, torch_dtype)
        hf_model.save_pretrained(staging)
        if arch == "starcoder2":
            write_top_level_rope_theta(staging, model.config.rope_theta)
        if chars is not None:
            write_char_tokenizer(staging, chars, model.config.block_size)
        else:
            write_gpt2_tokenizer(staging, model.config.block_size)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(arch, model, checkpoint, chars, n_tokens, torch_dtype, name))
        file_mode = 0o666 & ~current_umask()  # safetensors writes 0600; a shared model is readable like any file
        for file in os.listdir(staging):
            os.chmod(os.path.join(staging, file), file_mode)
        old = os.path.join(parent, f".{name}.replaced-{os.getpid()}")
        if os.path.isdir(hf_dir):  # empty, or an earlier export with overwrite: moved aside, then removed
            os.replace(hf_dir, old)
        os.replace(staging, hf_dir)
        if os.path.isdir(old):
            shutil.rmtree(old)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return arch, describe_trained(loaded)


def main() -> None:
    settings = read_settings(globals(), sys.argv[1:])
    folder = settings.hf_dir or os.path.join(settings.out_dir, "hf")
    arch, source = export(settings.out_dir, folder, settings.dtype, settings.overwrite, settings.checkpoint)
    print(f"exported as {HF_CLASS_NAMES[arch]} ({settings.dtype}) to {folder}: {source}")


if __name__ == "__main__":
    run_main(main)
