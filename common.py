"""
What train.py, sample.py and bench.py share and that is not the model: user-facing errors,
choosing the device and dtype, crash-safe checkpoints, and picking the tokenizer.
"""

import os
import sys
import json
import pickle
import zipfile
from contextlib import nullcontext

import torch


class UserError(Exception):
    """A mistake the user can fix: reported as one line on stderr, no traceback, exit code 1."""


def run_main(main):
    """Run a script's main(), turning a UserError into one clear line and a non-zero exit."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


# -----------------------------------------------------------------------------
# device and dtype

def pick_device(device="auto"):
    """'auto' picks cuda, then mps, then cpu; anything else is checked to exist."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but CUDA is not available here; use --device=auto or --device=cpu")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UserError(f"device={device!r} but MPS is not available here; use --device=auto or --device=cpu")
    if kind not in ("cuda", "mps", "cpu"):
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def pick_dtype(dtype, device):
    """'auto': bfloat16 where the GPU supports it, float16 (with a GradScaler) on older GPUs, float32 on CPU and MPS."""
    kind = device.split(":")[0]
    if dtype == "auto":
        if kind == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if dtype == "float16" and kind == "cpu":
        raise UserError("dtype=float16 is not supported on CPU; use float32 or bfloat16")
    return dtype


def autocast_context(device, dtype):
    """Mixed precision for the forward pass; float32 needs none."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


# -----------------------------------------------------------------------------
# checkpoints: a dict of tensors and plain values, readable with weights_only=True

def save_checkpoint(checkpoint, path):
    """Write to a temporary file in the same folder, flush it to disk, then rename it over `path`:
    a crash at any moment leaves either the old checkpoint or the new one, never a torn file."""
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint without running any code from it (weights_only=True); clear errors for the rest."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train one first, or point --out_dir at the folder that has ckpt.pt")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"refused to load {path}: it holds objects other than tensors and plain values, "
                        f"and loading it could run code ({first[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise UserError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); "
                        f"restore it from a backup or train again") from None
    if not isinstance(checkpoint, dict) or not {"model", "model_args"} <= checkpoint.keys():
        raise UserError(f"{path} is not a checkpoint written by train.py (no model weights and model_args in it)")
    return checkpoint


# -----------------------------------------------------------------------------
# tokenizers

def char_vocab_path(dataset, data_root="data"):
    return os.path.join(data_root, dataset, "meta.json")


def get_tokenizer(chars=None):
    """(encode, decode, start_ids): a character vocabulary (a list: token id -> character) when given,
    GPT-2 BPE otherwise. start_ids begin a sample with no prompt: <|endoftext|> for BPE, none for characters."""
    if chars is not None:
        stoi = {ch: i for i, ch in enumerate(chars)}
        def encode(text):
            unknown = sorted(set(ch for ch in text if ch not in stoi))
            if unknown:
                raise UserError(f"characters {''.join(unknown)!r} are not in the model's vocabulary of {len(chars)} characters")
            return [stoi[ch] for ch in text]
        return encode, lambda ids: "".join(chars[i] for i in ids), []
    import tiktoken
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # the BPE files are downloaded on first use; offline that fails
        raise UserError(f"could not load the GPT-2 tokenizer ({type(e).__name__}): tiktoken downloads it once; "
                        f"connect to the network once, or point TIKTOKEN_CACHE_DIR at a cache that has it") from None
    return (lambda text: enc.encode(text, allowed_special={"<|endoftext|>"})), enc.decode, [enc.eot_token]
