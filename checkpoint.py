"""
A training run's checkpoints: where they are, how they are written and read, and what a resume takes from them.

    out_dir/ckpt.pt    the state to continue from: model, optimizer, scaler, step, settings (every evaluation, a stop)
    out_dir/best.pt    the best-validated weights alone (only when the validation loss improves)
    out_dir/ckpt.dcp/  out_dir/best.dcp/   the same as DCP shards, each process writing its own part (FSDP on a
                       filesystem every process shares; sharded_checkpoint.py)

train.py asks open_checkpoints for the writer its run needs (Checkpoints: save / wait / close, written by
FileCheckpoints or ShardedCheckpoints), read_resume for the checkpoint a resume continues on any world size and
the model it holds, and restore for the optimizer's state. Every file is read without running code from it (weights_only=True, JSON).
sample.py, export_hf.py and eval_hellaswag.py read a run through load_trained (common.load_model).
"""

import os
import sys
import math
import uuid
import pickle
import shutil
import zipfile
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, fields
from functools import partial
from typing import BinaryIO

import torch
import torch.distributed as dist

from errors import UserError, ConfigError
from model import GPT, GPTConfig, GPT2_NAMES, GPT2_VOCAB_SIZE, load_model_state
from durable import write_atomically, tensor_bytes, unwritable, SHARDED_INDEX_NAME
from optimizers import OptimizerGroup
from distributed import gather_from_every_rank, on_rank_0_for_all, restart_count

CHECKPOINT_NAME = "ckpt.pt"  # the state to continue from: written at every evaluation and on a stop
BEST_NAME = "best.pt"  # the best-validated weights: written only when the validation loss improves
CHECKPOINT_CHOICES = ("auto", "best", "last")  # what a script that reads a trained model may ask for
# FSDP's checkpoints are folders of shards, the twins of the one-file paths: out_dir/ckpt.pt -> out_dir/ckpt.dcp/,
# whose checkpoint.json is written last, when the shards are complete
SHARDED_SUFFIX = ".dcp"
HANDOVER_CHUNK = 64 * 2**20  # bytes per broadcast when a checkpoint goes to processes that lack it
# train.py's settings of the model: GPTConfig's fields but vocab_size, which comes from the data
MODEL_SETTINGS = tuple(f.name for f in fields(GPTConfig) if f.name != "vocab_size")
ARCHITECTURE_SETTINGS = tuple(key for key in MODEL_SETTINGS if key != "dropout")  # dropout may change on resume
TRAINING_KEYS = ("optimizer", "iter_num", "best_val_loss", "config")  # what makes a checkpoint a run to continue
RUN_KEYS = ("evaluated", "best_val_loss", "world_size")  # in ckpt.pt, not in best.pt


# -----------------------------------------------------------------------------
# paths

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
    if os.path.isdir(sharded_path(path)):
        shutil.rmtree(sharded_path(path))


# -----------------------------------------------------------------------------
# one file: written atomically, read without running code, on any process

def save_checkpoint(checkpoint: dict, path: str) -> None:
    """torch.save(checkpoint) to `path` atomically (durable.write_atomically): a crash leaves the old checkpoint or
    the new one, never a torn file. A full disk or a folder that refuses the file is a UserError (what, where,
    how much was needed) with the old checkpoint untouched."""
    try:
        write_atomically(path, partial(torch.save, checkpoint))
    except (OSError, RuntimeError) as e:
        os_error = e  # torch.save reports a failed write as a RuntimeError raised while handling the OSError
        while os_error is not None and not isinstance(os_error, OSError):
            os_error = os_error.__context__
        if os_error is None:
            raise
        raise unwritable(path, os_error, tensor_bytes(checkpoint)) from None


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


def checkpoint_step(path):
    """The step of the checkpoint at `path`, read without loading its tensors (memory-mapped); None when there
    is none, -1 when it cannot be read (loading it reports why, if no process has a better one)."""
    if not os.path.exists(path):
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["iter_num"])
    except Exception:  # damaged, or not train.py's: any readable copy elsewhere is better
        return -1


def read_checkpoint_everywhere(ckpt_path, processes):
    """
    The checkpoint on every process: the newest copy (by step; the lowest rank among equals) wins, wherever it
    is, so a requeue that puts rank 0 on a node with an older copy, or none, still continues the run. A process
    whose own copy has that step reads it (one machine, a shared filesystem); the others receive the file,
    streamed in HANDOVER_CHUNK pieces into a temporary file beside their ckpt.pt and loaded from there, so no
    process holds more than one chunk of it in flight. Received files load with weights_only=True too.
    """
    if not processes.distributed:
        return load_checkpoint(ckpt_path)
    step = checkpoint_step(ckpt_path)
    offers = gather_from_every_rank((step, os.path.getsize(ckpt_path) if step is not None else 0), processes)
    source = max(range(processes.world_size), key=lambda r: (offers[r][0] if offers[r][0] is not None else -2, -r))
    if offers[source][0] is None:
        raise UserError(f"no checkpoint at {ckpt_path} on any node; train one first, or point --out_dir at the folder "
                        f"that has {os.path.basename(ckpt_path)}")
    receivers = [r for r in range(processes.world_size) if offers[r][0] != offers[source][0]]
    if not receivers:
        return load_checkpoint(ckpt_path)
    group = dist.new_group([source, *receivers])  # every process creates it; only these take part in the transfer
    if processes.rank == source:
        send_file(ckpt_path, offers[source][1], source, group)
    elif processes.rank in receivers:
        received = f"{ckpt_path}.from-rank{source}.{processes.rank}.tmp"
        try:
            receive_file(received, offers[source][1], source, group)
            return load_checkpoint(received, name=ckpt_path)  # the same name: one message for one damaged file
        finally:
            if os.path.exists(received):
                os.remove(received)
    return load_checkpoint(ckpt_path)


def transfer_buffer():
    """A chunk buffer where the process group's backend can send it: the GPU under NCCL, the CPU under gloo."""
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    return torch.empty(HANDOVER_CHUNK, dtype=torch.uint8, device=device)


def send_file(path, size, source, group):
    buffer = transfer_buffer()
    with open(path, "rb") as f:
        for start in range(0, size, HANDOVER_CHUNK):
            n = min(HANDOVER_CHUNK, size - start)
            buffer[:n].copy_(torch.frombuffer(bytearray(f.read(n)), dtype=torch.uint8))
            dist.broadcast(buffer[:n], src=source, group=group)


def receive_file(path, size, source, group):
    buffer = transfer_buffer()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        for start in range(0, size, HANDOVER_CHUNK):
            n = min(HANDOVER_CHUNK, size - start)
            dist.broadcast(buffer[:n], src=source, group=group)
            f.write(buffer[:n].cpu().numpy().tobytes())


# -----------------------------------------------------------------------------
# the model of a checkpoint: sample.py, export_hf.py, eval_hellaswag.py (common.load_model) and a resume

@dataclass
class LoadedModel:
    model: GPT
    checkpoint: dict | None = None  # the whole train.py checkpoint (optimizer, RNG, ...) for 'resume'
    chars: list | None = None  # the character vocabulary of a character-level model; None means GPT-2 BPE
    path: str | None = None  # the checkpoint file it came from; None for a GPT-2 name or a Hugging Face folder


def is_character_vocabulary(vocab_size: int) -> bool:
    """A vocabulary smaller than GPT-2's BPE is a character set: its tokens decode only through its character list."""
    return vocab_size < GPT2_VOCAB_SIZE


def model_of(checkpoint: dict, path: str) -> GPT:
    """GPT(checkpoint's model_args) with the checkpoint's weights when it holds them (a sharded checkpoint's values
    hold none: restore fills them once the model is sharded)."""
    try:
        model = GPT(GPTConfig.from_dict(checkpoint["model_args"]))
        if "model" in checkpoint:
            load_model_state(model, checkpoint["model"])
    except ConfigError as e:
        raise UserError(f"{path}: {e}") from None
    return model


def load_trained(out_dir: str, need_decoding: bool = True, which: str = "auto") -> LoadedModel:
    """The model of a checkpoint train.py wrote in out_dir: `which` as checkpoint_path takes it (by default
    best.pt when the run has one, else ckpt.pt), one file or shards, read whole on this process.
    A character-level model without its character list is a UserError unless need_decoding=False."""
    path = checkpoint_path(out_dir, which)
    path = current_checkpoint(path) or path  # the file, or its sharded twin: the one read, named in messages
    checkpoint = load_checkpoint(path)
    model = model_of(checkpoint, path)
    chars = checkpoint.get("chars")
    if need_decoding and chars is None and is_character_vocabulary(model.config.vocab_size):
        raise UserError(f"{path} has a {model.config.vocab_size}-token vocabulary but no character list, "
                        f"so its tokens cannot be decoded")
    return LoadedModel(model, checkpoint, chars, path)


def describe_trained(loaded: "LoadedModel") -> str:
    """Which file a script read, at which step and with which validation loss: said by every script that reads a
    run. best.pt holds the loss of its own weights; ckpt.pt only the run's best so far (at a stop, or after an
    evaluation that did not improve, its weights have no loss of their own), named as that."""
    checkpoint = loaded.checkpoint
    own, best = checkpoint.get("val_loss"), checkpoint.get("best_val_loss")
    if is_finite_loss(own):
        loss_text = f", val loss {own:.4f}"
    elif is_finite_loss(best):
        loss_text = f", best val loss so far {best:.4f}"
    else:
        loss_text = ""
    return f"read {loaded.path} (step {checkpoint.get('iter_num', '?')}{loss_text})"


def is_finite_loss(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


# -----------------------------------------------------------------------------
# a resume: where a launch starts, what it adopts from the checkpoint and what it refuses

def check_out_dir_and_sources(settings):
    """out_dir can hold the run's checkpoints, and init_from and auto_from name something to start from."""
    if os.path.exists(settings.out_dir) and not os.path.isdir(settings.out_dir):
        raise UserError(f"out_dir {settings.out_dir!r} is a file, not a folder; choose another --out_dir")
    parent = os.path.abspath(settings.out_dir)
    while not os.path.exists(parent):  # the folder that will hold out_dir must be a writable folder
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"out_dir {settings.out_dir!r} cannot be created under {parent} (not a writable folder); choose another --out_dir")
    sources = ("scratch", "resume", "auto", *GPT2_NAMES)
    if settings.init_from not in sources and not os.path.isdir(settings.init_from):
        raise UserError(f"unknown init_from {settings.init_from!r}; use {', '.join(sources)} or a local folder in the Hugging Face format")
    if settings.auto_from not in ("scratch", *GPT2_NAMES) and not os.path.isdir(settings.auto_from):
        raise UserError(f"unknown auto_from {settings.auto_from!r} (what init_from=auto starts a new run from); "
                        f"use scratch, {', '.join(GPT2_NAMES)} or a local folder in the Hugging Face format")


def resolve_init_from(settings, processes):
    """
    Where this launch starts: 'resume' when some process's out_dir holds the run's checkpoint and the launch is
    init_from=auto or any restart (a torchrun restart or a SLURM requeue of a run that began from scratch, a
    GPT-2 name or a folder continues that run: starting over would overwrite its progress); otherwise
    init_from, or auto_from for 'auto'.
    """
    ckpt_path = checkpoint_path(settings.out_dir)
    fresh = settings.auto_from if settings.init_from == "auto" else settings.init_from
    if settings.init_from == "resume" or (settings.init_from != "auto" and restart_count() == 0):
        return settings.init_from
    found = any(gather_from_every_rank(current_checkpoint(ckpt_path) is not None, processes))
    if found and settings.init_from != "auto" and processes.master:
        print(f"restart {restart_count()} of a run that began from {fresh}: resuming from {ckpt_path} instead of starting over",
              file=sys.stderr, flush=True)
    return "resume" if found else fresh


def sharded_resume_source(ckpt_path, processes):
    """
    The sharded checkpoint (ckpt.dcp/) to resume from when the run's newest checkpoint is one, else None (ckpt.pt,
    read by read_checkpoint_everywhere). Every process reads its own part of it, so every process must see it: a
    filesystem the nodes share.
    """
    found = current_checkpoint(ckpt_path)
    sharded = gather_from_every_rank(found is not None and os.path.isdir(found), processes)
    if not any(sharded):
        return None
    if not all(sharded):
        raise UserError(f"{sharded_path(ckpt_path)} is sharded (every process reads its own part) but ranks "
                        f"{[r for r, seen in enumerate(sharded) if not seen]} do not see it: keep out_dir on a "
                        f"filesystem every node shares")
    return found


def read_resume(settings, assigned, processes, chars, vocab_size, on_meta):
    """
    (model on the CPU, checkpoint) of the run in out_dir, on every process and on any world size: its settings
    adopted (adopt_checkpoint_settings: `assigned` are the ones the user set) and its vocabulary checked against
    the data's `chars` and `vocab_size`. One file holds the weights (read_checkpoint_everywhere); a sharded
    checkpoint gives its values only, and the model (on the meta device with on_meta: FSDP) waits for restore.
    """
    ckpt_path = checkpoint_path(settings.out_dir)
    shards = sharded_resume_source(ckpt_path, processes)
    if shards is not None:  # only the values now; each process reads its part once the model is sharded
        from sharded_checkpoint import read_index
        path, checkpoint = shards, dict(read_index(shards), shards=shards)
        missing = [k for k in ("with_optimizer", *TRAINING_KEYS[1:]) if k not in checkpoint]
        hint = "export it and start from the folder with --init_from=<folder>"
    else:
        path, checkpoint = ckpt_path, read_checkpoint_everywhere(ckpt_path, processes)
        missing = [k for k in TRAINING_KEYS if k not in checkpoint]
        hint = "start from it with --init_from=scratch and load it elsewhere, or export it and use --init_from=<folder>"
    if missing:
        raise UserError(f"{path} holds a model but not a training run (no {', '.join(missing)}); {hint}")
    adopt_checkpoint_settings(settings, assigned, checkpoint, path)
    with torch.device("meta") if on_meta and shards is not None else nullcontext():
        model = model_of(checkpoint, path)
    if checkpoint.get("chars") != chars or (is_character_vocabulary(vocab_size) and model.config.vocab_size != vocab_size):
        raise UserError(f"{path} was trained on another vocabulary than {settings.dataset}'s; resume it on its own "
                        f"data set ({checkpoint['config'].get('dataset', '?')})")
    return model, checkpoint


def adopt_checkpoint_settings(settings, assigned, checkpoint, ckpt_path):
    """
    A resume continues the checkpoint's model: an architecture setting the user set (config file or command
    line) that differs from it is refused, in one line naming each field with both values; the unset ones,
    and seed and dropout when unset, are taken from it. Dropout as set is the model's from now on.
    """
    # a checkpoint from before a field existed was trained with that field's default
    saved = {**{f.name: f.default for f in fields(GPTConfig)}, **checkpoint["model_args"]}
    wanted = dict(saved, **{key: getattr(settings, key) for key in ARCHITECTURE_SETTINGS if key in assigned})
    if wanted["n_kv_head"] is None:  # None means n_head, as GPTConfig reads it
        wanted["n_kv_head"] = wanted["n_head"]
    if isinstance(wanted["window"], tuple):
        wanted["window"] = list(wanted["window"])
    differ = [key for key in ARCHITECTURE_SETTINGS if wanted[key] != saved.get(key)]
    if differ:
        raise UserError(f"{ckpt_path} holds another architecture than the one asked for (" +
                        ", ".join(f"--{key}={getattr(settings, key)!r} but the checkpoint has {saved.get(key)!r}" for key in differ) +
                        "); a resume cannot change the architecture: drop these settings, or start a new run in another --out_dir")
    saved_seed = checkpoint["config"].get("seed", settings.seed)
    if "seed" in assigned and settings.seed != saved_seed:
        raise UserError(f"the checkpoint was trained with seed={saved_seed}, which fixes its batches and dropout; "
                        f"resume with --seed={saved_seed} or without --seed")
    for key in (*MODEL_SETTINGS, "seed"):
        if key not in assigned:
            setattr(settings, key, saved_seed if key == "seed" else saved[key])
    checkpoint["model_args"] = dict(saved, dropout=settings.dropout)


def changed_settings(settings, checkpoint, world_size):
    """{setting: (the checkpoint's run's value, this run's)} for every setting a resume changes (none for a new run),
    the number of processes included."""
    if checkpoint is None:
        return {}
    before = checkpoint["config"]
    changes = {key: (before[key], value) for key, value in vars(settings).items()
               if key in before and key not in ("init_from", *ARCHITECTURE_SETTINGS) and before[key] != value and not
               (isinstance(value, tuple) and list(value) == before[key])}
    if checkpoint.get("world_size", world_size) != world_size:
        changes["world_size"] = (checkpoint["world_size"], world_size)
    return changes


def restore(checkpoint, model, optimizer, scaler):
    """The checkpoint's training state into the model placed and wrapped for this run: every process reads its part
    of a sharded one, on any world size; one file gives the optimizer's moments and the scaler's state."""
    if "shards" in checkpoint:
        from sharded_checkpoint import load_training_state
        load_training_state(checkpoint["shards"], model, optimizer)
    else:
        restore_training_state(checkpoint, model, optimizer, scaler)


def restore_training_state(checkpoint, raw_model, optimizer, scaler):
    """The optimizer's moments (AdamW's, and Muon's momentum) and the scaler's state from the checkpoint; the
    hyperparameters stay this run's settings (loading an optimizer state would bring back the betas, weight decay,
    learning rates and fused flag it was saved with)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict, StateDictOptions
    trained_with = checkpoint["config"].get("optimizer", "adamw")  # checkpoints from before Muon are AdamW's
    optimizer_name = "muon" if isinstance(optimizer, OptimizerGroup) else "adamw"
    if trained_with != optimizer_name:
        raise UserError(f"the checkpoint was trained with --optimizer={trained_with}, whose state does not fit "
                        f"--optimizer={optimizer_name}; resume with --optimizer={trained_with}")
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    set_optimizer_state_dict(raw_model, optimizer, checkpoint["optimizer"], options=StateDictOptions(full_state_dict=True))
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    if checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])


@dataclass
class RunPosition:
    """Where the run stands: the step about to be taken, the best validation loss so far, the step a resumed
    checkpoint had evaluated already (not evaluated again), and the step of the last checkpoint written."""
    step: int = 0
    best_val_loss: float = math.inf
    evaluated_step: int | None = None
    saved_step: int | None = None

    @classmethod
    def of(cls, checkpoint, eval_only):
        if checkpoint is None:
            return cls()
        step = checkpoint["iter_num"]
        evaluated = checkpoint.get("evaluated", True) and not eval_only
        return cls(step, checkpoint["best_val_loss"], step if evaluated else None, step)


# -----------------------------------------------------------------------------
# writing a run's checkpoints: one interface (save, wait, close), two implementations

class Checkpoints(ABC):
    """What a run asks of its checkpoints, however they are written: save (ckpt.pt, and best.pt with an improved
    validation loss), wait for a save in progress, close; `where` a resume finds them, and `note`, what the start
    line says about them (None: nothing to say)."""
    in_background = False  # a save returns before its files are written
    note = None

    def __init__(self, out_dir):
        self.last, self.best = checkpoint_path(out_dir, "last"), checkpoint_path(out_dir, "best")

    @abstractmethod
    def save(self, values, model, optimizer, scaler, val_loss=None):
        """ckpt.pt from `values` (plain values) and the state of model, optimizer and scaler; with val_loss (an
        improved validation loss) best.pt, the weights alone, after it. Every process calls it. Returns the paths
        written."""

    @property
    def where(self):
        return self.last

    def wait(self):  # noqa: B027  (a writer that saves in the foreground has nothing to wait for)
        """Block until the save in progress, if any, is written; re-raise what it failed with."""

    def close(self):
        self.wait()

    @staticmethod
    def weights_values(values, val_loss):
        """best.pt's values: ckpt.pt's but those of the run (RUN_KEYS), with the validation loss."""
        return dict({k: v for k, v in values.items() if k not in RUN_KEYS}, val_loss=val_loss)


class FileCheckpoints(Checkpoints):
    """ckpt.pt and best.pt: every process takes part in gathering the state, rank 0 writes, and a file it cannot
    write (a full disk) ends every process with its one line."""

    def __init__(self, out_dir, note=None):
        super().__init__(out_dir)
        self.note = note  # FSDP on a filesystem the nodes do not share

    def save(self, values, model, optimizer, scaler, val_loss=None):
        from torch.distributed.checkpoint.state_dict import get_state_dict, StateDictOptions
        model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

        def write():
            save_checkpoint(dict(values, model=model_sd, optimizer=optim_sd, scaler=scaler.state_dict()), self.last)
            remove_sharded_twin(self.last)  # an FSDP run's older state, if this run changed from FSDP
            if val_loss is not None:
                save_checkpoint(dict(self.weights_values(values, val_loss), model=model_sd), self.best)
                remove_sharded_twin(self.best)
        on_rank_0_for_all(write)
        return [self.last] + ([self.best] if val_loss is not None else [])


class ShardedCheckpoints(Checkpoints):
    """ckpt.dcp/ and best.dcp/, each process writing its own shards (sharded_checkpoint.py), in the background
    with asynchronous=True (the next save, wait() or close() waits for the one in progress). The scaler is off
    under FSDP (bfloat16): it has no state to keep."""

    def __init__(self, out_dir, asynchronous):
        from sharded_checkpoint import ShardedCheckpointer
        super().__init__(out_dir)
        self.writer = ShardedCheckpointer(asynchronous=asynchronous)
        self.in_background = asynchronous
        self.note = "sharded, each process writing its own part" + (" in the background" if asynchronous else "")

    def save(self, values, model, optimizer, scaler, val_loss=None):
        self.writer.save(sharded_path(self.last), model, optimizer, values, replaces=self.last)
        if val_loss is None:
            return [sharded_path(self.last)]
        self.writer.save(sharded_path(self.best), model, None, self.weights_values(values, val_loss), replaces=self.best)
        return [sharded_path(self.last), sharded_path(self.best)]

    @property
    def where(self):
        return sharded_path(self.last)

    def wait(self):
        self.writer.wait()

    def close(self):
        self.writer.close()


def open_checkpoints(settings, processes):
    """The writer of this run's checkpoints: shards under FSDP when every process sees out_dir (each writes its part
    beside the others'), else one file, written by rank 0."""
    if not (processes.distributed and settings.fsdp):
        return FileCheckpoints(settings.out_dir)
    if out_dir_is_shared(settings.out_dir, processes):
        return ShardedCheckpoints(settings.out_dir, settings.async_checkpoint)
    return FileCheckpoints(settings.out_dir, "one file gathered on rank 0, written there: out_dir is not on a filesystem "
                           "every node shares" + (" (async_checkpoint needs one: ignored)" if settings.async_checkpoint else ""))


def out_dir_is_shared(out_dir, processes):
    """Whether every process's out_dir is the folder rank 0 writes to (one machine, or a filesystem the nodes
    share): what sharded checkpoints need, each process writing its own part beside the others'. Rank 0 leaves a
    file in its out_dir and every process looks for it in its own."""
    name = [f".shared-{uuid.uuid4().hex}"]
    dist.broadcast_object_list(name, src=0)
    probe = os.path.join(out_dir, name[0])  # each process's own out_dir: the same folder, or another node's
    if processes.master:
        os.makedirs(out_dir, exist_ok=True)
        open(probe, "w").close()
    dist.barrier()
    seen = gather_from_every_rank(os.path.exists(probe), processes)
    if processes.master:
        os.remove(probe)
    return all(seen)


def has_checkpoint(out_dir):
    """Whether out_dir holds a run's checkpoint to continue from (one file or shards)."""
    return current_checkpoint(checkpoint_path(out_dir)) is not None
