"""
What the scripts share and that is not the model: user-facing errors and range checks, choosing the
device and dtype, the GPU peak-FLOPs table, crash-safe checkpoints, the model loaders (a new model, a
trained checkpoint, a GPT-2 name or a Hugging Face folder; load_model picks by --init_from), and the tokenizer.
"""

import os
import sys
import json
import pickle
import zipfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import BinaryIO, NamedTuple
from dataclasses import dataclass

import torch

from model import GPT, GPTConfig, ConfigError, GPT2_NAMES, GPT2_VOCAB_SIZE, load_model_state


class UserError(Exception):
    """A mistake the user can fix: reported as one line on stderr, no traceback, exit code 1."""


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's main(), turning a UserError into one clear line and exit status 1, and a status main()
    returns (train.py's 75 for a run stopped on request) into the process's exit status."""
    try:
        status = main()
    except UserError as e:
        message = f"error: {e}"
        if first_to_report(message):
            print(message, file=sys.stderr, flush=True)
        sys.exit(1)
    if status:
        sys.exit(status)


def first_to_report(message: str) -> bool:
    """
    Under torchrun every process usually meets the same mistake (a setting, a file): the first process to
    report a message prints it and the others stay quiet, so 8 GPUs print one line, not 8. torchrun's store,
    served by its agent, counts the reports; a message only one rank meets is still printed. Run alone,
    or with no agent store to ask, every message is printed.
    """
    if "RANK" not in os.environ or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return True
    import hashlib
    from datetime import timedelta
    try:
        store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                           is_master=False, timeout=timedelta(seconds=10))
        return store.add(f"user_error/{hashlib.sha256(message.encode()).hexdigest()}", 1) == 1
    except (RuntimeError, OSError, ValueError, KeyError):  # no store to ask: better twice than never
        return True


def range_check(values: dict) -> Callable[[bool, str, str], None]:
    """need(ok, key, rule): unless ok, a UserError that names --key, its value in `values` and the rule."""
    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise UserError(f"--{key}={values[key]!r} is out of range: {rule}")
    return need


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
# checkpoints: a dict of tensors and plain values, readable with weights_only=True

CHECKPOINT_NAME = "ckpt.pt"  # the state to continue from: written at every evaluation and on a stop
BEST_NAME = "best.pt"  # the best-validated weights: written only when the validation loss improves
CHECKPOINT_CHOICES = ("auto", "best", "last")  # what a script that reads a trained model may ask for


def checkpoint_path(out_dir: str, which: str = "last") -> str:
    """The one place that knows a run's files: 'last' is the state to continue from (out_dir/ckpt.pt),
    'best' the best-validated weights (out_dir/best.pt), 'auto' the best when the run has written one,
    else the last."""
    if which not in CHECKPOINT_CHOICES:
        raise UserError(f"unknown checkpoint {which!r}; use {', '.join(CHECKPOINT_CHOICES)} "
                        f"(auto: {BEST_NAME} when present, else {CHECKPOINT_NAME})")
    best = os.path.join(out_dir, BEST_NAME)
    if which == "best" or (which == "auto" and current_checkpoint(best) is not None):
        return best
    return os.path.join(out_dir, CHECKPOINT_NAME)


def save_checkpoint(checkpoint: dict, path: str) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename it over `path`:
    a crash at any moment leaves either the old checkpoint or the new one, never a torn file. A full
    disk or a folder that refuses the file is a UserError (what, where, how much was needed) with the
    temporary file removed and the old checkpoint untouched."""
    tmp_path = f"{path}.tmp"
    try:
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
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        os_error = e  # torch.save reports a failed write as a RuntimeError raised while handling the OSError
        while os_error is not None and not isinstance(os_error, OSError):
            os_error = os_error.__context__
        if os_error is None:
            raise
        raise unwritable(path, os_error, tensor_bytes(checkpoint)) from None


def tensor_bytes(value) -> int:
    """The bytes of the tensors in a nest of dicts, lists and tuples: what a checkpoint of them needs on disk."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def unwritable(path: str, error: OSError, needed: int) -> UserError:
    """A full disk or a refused folder while writing `path`, said in one line. Any other OSError is a bug: re-raised."""
    import errno
    import shutil
    if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG):
        raise error
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
    return UserError(f"could not write {path}: {error.strerror} (it needs about {needed / 2**20:,.1f} MiB, "
                     f"{free / 2**20:,.1f} MiB free there); free some space or choose another --out_dir, "
                     f"then resume with --init_from=resume")


# FSDP's checkpoints are folders of shards (sharded_checkpoint.py), the twins of the one-file paths:
# out_dir/ckpt.pt -> out_dir/ckpt.dcp/, whose checkpoint.json is written last, when the shards are complete
SHARDED_SUFFIX = ".dcp"
SHARDED_INDEX_NAME = "checkpoint.json"


def sharded_path(path: str) -> str:
    """The sharded twin of a one-file checkpoint path: out_dir/ckpt.pt -> out_dir/ckpt.dcp."""
    return os.path.splitext(path)[0] + SHARDED_SUFFIX


def current_checkpoint(path: str) -> str | None:
    """
    The checkpoint to read for the one-file path `path` (out_dir/ckpt.pt): that file or its sharded twin
    (out_dir/ckpt.dcp), whichever exists; when both do (a run that changed between FSDP and one process or DDP
    and stopped before removing the other), the one written last. None when there is neither.
    """
    twin = sharded_path(path)
    written = {p: os.stat(marker).st_mtime_ns for p, marker in ((path, path), (twin, os.path.join(twin, SHARDED_INDEX_NAME)))
               if os.path.isfile(marker)}
    return max(written, key=written.get) if written else None


def remove_sharded_twin(path: str) -> None:
    """Once the one-file checkpoint `path` is written, its sharded twin (an FSDP run's older state) goes."""
    import shutil
    if os.path.isdir(sharded_path(path)):
        shutil.rmtree(sharded_path(path))


def is_torch_save_file(path: str) -> bool:
    """Whether the file begins as torch.save's files do: a zip archive, or (older torch, other programs) a
    pickle. An empty file passes: torch.load says it is cut short."""
    with open(path, "rb") as f:
        start = f.read(4)
    return not start or start.startswith(b"PK\x03\x04") or start[:1] == b"\x80"


def load_checkpoint(source: str | BinaryIO, map_location: str = "cpu", name: str | None = None) -> dict:
    """Load a checkpoint (a path, or a file-like object named `name` in messages) without running any code
    from it (weights_only=True); clear errors for the rest. A path whose checkpoint is sharded (its twin
    folder, or the folder itself) is read whole on this one process, no process group needed."""
    name = name or source
    if isinstance(source, str):
        source = current_checkpoint(source) or source
        if os.path.isdir(source):
            from sharded_checkpoint import read_whole  # torch.distributed.checkpoint takes a while to import
            return read_whole(source)
    if isinstance(source, str) and not os.path.exists(source):
        if os.path.isdir(sharded_path(source)):  # checkpoint.json is written last: a first save cut short, or removed
            raise UserError(f"{sharded_path(source)} has no {SHARDED_INDEX_NAME}: its save did not finish or the file "
                            f"was removed; restore it from a backup or train again")
        raise UserError(f"no checkpoint at {source}; train one first, or point --out_dir at the folder that has {os.path.basename(source)}")
    if isinstance(source, str) and not is_torch_save_file(source):
        raise UserError(f"{name} is not a checkpoint: it is neither a file torch.save writes nor a pickle (another "
                        f"file in its place, or damaged); restore it from a backup or train again")
    try:
        checkpoint = torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"refused to load {name}: it holds objects other than tensors and plain values, "
                        f"and loading it could run code ({first[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise UserError(f"checkpoint {name} is truncated or corrupt ({type(e).__name__}); "
                        f"restore it from a backup or train again") from None
    if not isinstance(checkpoint, dict) or not {"model", "model_args"} <= checkpoint.keys():
        raise UserError(f"{name} is not a checkpoint written by train.py (no model weights and model_args in it)")
    return checkpoint


# -----------------------------------------------------------------------------
# the one road from a source to a ready model

@dataclass
class LoadedModel:
    model: GPT
    checkpoint: dict | None = None  # the whole train.py checkpoint (optimizer, RNG, ...) for 'resume'
    chars: list | None = None  # the character vocabulary of a character-level model; None means GPT-2 BPE
    path: str | None = None  # the checkpoint file it came from; None for a GPT-2 name or a Hugging Face folder


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


def is_character_vocabulary(vocab_size: int) -> bool:
    """A vocabulary smaller than GPT-2's BPE is a character set: its tokens decode only through its character list."""
    return vocab_size < GPT2_VOCAB_SIZE


def new_model(model_args: dict) -> GPT:
    """GPT(GPTConfig(**model_args)), freshly initialised; settings that make no model are a UserError."""
    try:
        return GPT(GPTConfig(**model_args))
    except ConfigError as e:
        raise UserError(str(e)) from None


def load_trained(out_dir: str, checkpoint: dict | None = None, need_decoding: bool = True,
                 which: str = "auto") -> LoadedModel:
    """The model of a checkpoint train.py wrote in out_dir: `which` as checkpoint_path takes it (by default
    best.pt when the run has one, else ckpt.pt), or `checkpoint`, already read from out_dir/ckpt.pt.
    A character-level model without its character list is a UserError unless need_decoding=False."""
    path = checkpoint_path(out_dir, "last" if checkpoint is not None else which)
    path = current_checkpoint(path) or path  # the file, or its sharded twin: the one read, named in messages
    if checkpoint is None:
        checkpoint = load_checkpoint(path)
    try:
        model = GPT(GPTConfig.from_dict(checkpoint["model_args"]))
        load_model_state(model, checkpoint["model"])
    except ConfigError as e:
        raise UserError(f"{path}: {e}") from None
    chars = checkpoint.get("chars")
    if need_decoding and chars is None and is_character_vocabulary(model.config.vocab_size):
        raise UserError(f"{path} has a {model.config.vocab_size}-token vocabulary but no character list, "
                        f"so its tokens cannot be decoded")
    return LoadedModel(model, checkpoint, chars, path)


def describe_trained(loaded: "LoadedModel") -> str:
    """Which file a script read, at which step and validation loss: said by every script that reads a run."""
    checkpoint = loaded.checkpoint
    val_loss = checkpoint.get("val_loss", checkpoint.get("best_val_loss"))
    loss_text = f", val loss {val_loss:.4f}" if isinstance(val_loss, float) and val_loss != float("inf") else ""
    return f"read {loaded.path} (step {checkpoint.get('iter_num', '?')}{loss_text})"


def load_pretrained(source: str, overrides: dict | None = None, need_decoding: bool = True) -> LoadedModel:
    """GPT.from_pretrained of a GPT-2 name or a Hugging Face folder, with `overrides` among
    GPTConfig.PRETRAINED_OVERRIDES, and the folder's character list when it has one."""
    try:
        model = GPT.from_pretrained(source, overrides)
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


# -----------------------------------------------------------------------------
# run logs

def ends_inside_a_line(path: str) -> bool:
    """Whether the file ends without its last newline: a record that a crash tore mid-write. Whoever appends
    to it starts a new line first, so that the next record stays whole (and the torn one is skipped by readers)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"
