"""
Checkpoints in shards, as FSDP writes them: every process writes and reads its own part of the model and the
optimizer state with torch.distributed.checkpoint (DCP), so no process ever holds the whole state, and a run
resumes on any number of processes (DCP reshards on load), or is read whole by one process without torchrun.

A sharded checkpoint is a folder, the twin of the one-file checkpoint (out_dir/ckpt.pt -> out_dir/ckpt.dcp/):

    ckpt.dcp/checkpoint.json     everything but the tensors (step, model_args, config, world size, characters...)
                                 and the name of the folder that holds the shards; replaced atomically
    ckpt.dcp/step-00000500-<id>/ the shards of that step: DCP's index (.metadata) and one file per process

A save writes a new step folder, then switches checkpoint.json to it, then removes the folder it replaced: a crash
at any moment leaves the previous checkpoint loadable. Loading never runs code from the files: checkpoint.json is
JSON, DCP's index is unpickled with only DCP's own metadata classes allowed, and the shards hold only tensors
(read with weights_only=True).
"""

import io
import os
import json
import time
import pickle
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict, StateDictOptions

from errors import UserError
from distributed import on_rank_0_for_all
from durable import write_atomically, tensor_bytes, unwritable, SHARDED_INDEX_NAME as INDEX_NAME

STEP_PREFIX = "step-"
SHARDED = StateDictOptions(full_state_dict=False)  # each process's own shards, never a gathered copy
# one process reading a checkpoint alone is what is meant; DCP warns that it assumes so (from its writer thread too)
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized", category=UserWarning)


# -----------------------------------------------------------------------------
# reading: the index, DCP's metadata and the shards, without running code from them

class RefusedIndex(pickle.UnpicklingError):
    """A DCP index that holds something other than DCP's own metadata classes and tensor entries."""


class _DCPMetadataUnpickler(pickle.Unpickler):
    """DCP keeps its index (.metadata) as a pickle. Only the classes such an index is made of may be built
    from it; anything else (a function to call, say) makes the checkpoint refused."""
    ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                       "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension")
    ALLOWED = {("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
               ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
               ("pathlib", "Path")} | {("torch", name) for name in (
                   "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                   "strided", "sparse_coo", "contiguous_format", "channels_last", "preserve_format")}

    def find_class(self, module, name):
        if module in self.ALLOWED_MODULES or (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise RefusedIndex(f"{module}.{name} is not part of a DCP index")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with its index unpickled by _DCPMetadataUnpickler, and only tensors in it: DCP would
    read any other entry with torch.load(weights_only=False)."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _DCPMetadataUnpickler(io.BytesIO(f.read())).load()
        if not all(isinstance(m, TensorStorageMetadata) for m in metadata.state_dict_metadata.values()):
            raise RefusedIndex("it holds entries other than tensors")
        from torch.distributed.checkpoint.metadata import StorageMeta
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_index(path: str) -> dict:
    """checkpoint.json of the sharded checkpoint `path`: its values, with 'shards' the folder of the shards."""
    index_path = os.path.join(path, INDEX_NAME)
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}; train one first, or point --out_dir at the folder that has it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{index_path} is damaged ({type(e).__name__}); restore it from a backup or train again") from None
    if not isinstance(index, dict) or not {"model_args", "shards"} <= index.keys() or not isinstance(index["shards"], str):
        raise UserError(f"{index_path} is not a sharded checkpoint written by train.py (no model_args and shards in it)")
    shards = os.path.join(path, index["shards"])
    if os.path.dirname(os.path.normpath(index["shards"])) or not os.path.isdir(shards):
        raise UserError(f"{index_path} names shards {index['shards']!r} that are not in {path}; restore the folder "
                        f"from a backup or train again")
    return index


def shard_reader(path: str, index: dict) -> SafeFileSystemReader:
    return SafeFileSystemReader(os.path.join(path, index["shards"]))


def shard_metadata(path: str, index: dict):
    """DCP's index of the shards: each tensor's name, shape and dtype. A damaged one is a UserError."""
    try:
        return shard_reader(path, index).read_metadata()
    except RefusedIndex as e:
        raise UserError(f"refused to load {path}: its shard index {e}, and loading it could run code") from None
    except FileNotFoundError:
        raise UserError(f"the shard index (.metadata) of {path} is missing; restore the folder from a backup or "
                        f"train again") from None
    except (pickle.UnpicklingError, EOFError, OSError, AttributeError, ValueError, TypeError) as e:
        raise UserError(f"the shard index of {path} is truncated or corrupt ({type(e).__name__}); "
                        f"restore it from a backup or train again") from None


def load_into(path: str, state: dict, index: dict | None = None) -> None:
    """Fill the tensors of `state` (nested dicts, plain tensors or DTensors) from the sharded checkpoint at
    `path`, each process reading what its own tensors need; alone when there is no process group."""
    index = index or read_index(path)
    metadata = shard_metadata(path, index)  # checked here: DCP would unpickle it itself
    # every process checks every file, not only its own, so that all of them stop with the same line before
    # DCP's collective load (which would fail on some ranks only, with its own traceback)
    folder = os.path.join(path, index["shards"])
    missing = sorted({item.relative_path for item in metadata.storage_data.values()
                      if not os.path.isfile(os.path.join(folder, item.relative_path))})
    if missing:
        raise UserError(f"{path} is missing shard file(s) {', '.join(missing)} of {index['shards']}: a copy or a "
                        f"cleanup left them out; restore the folder from a backup or train again")
    try:
        dcp.load(state, storage_reader=shard_reader(path, index), no_dist=alone())
    except dcp.api.CheckpointException as e:
        raise UserError(f"the shards of {path} do not fit this model or are damaged "
                        f"({str(e).strip().splitlines()[-1][:200]}); restore them from a backup or train again") from None


def read_whole(path: str) -> dict:
    """
    The sharded checkpoint at `path` read whole by one process, without torchrun or a process group, as the
    dict a one-file checkpoint holds: 'model' (every weight, full size) and the values of checkpoint.json.
    What sample.py, export_hf.py, eval_hellaswag.py and bench.py load through checkpoint.load_checkpoint.
    """
    index = read_index(path)
    metadata = shard_metadata(path, index)
    model = {name.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
             for name, m in metadata.state_dict_metadata.items() if name.startswith("model.")}
    if not model:
        raise UserError(f"{path} holds no model weights; restore it from a backup or train again")
    state = {"model": model}
    load_into(path, state, index)
    values = {k: v for k, v in index.items() if k != "shards"}
    return dict(values, model=state["model"])


# -----------------------------------------------------------------------------
# a training run's state: the model, and the optimizer's moments

def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, list]:
    """The tensors a checkpoint holds, as this process has them (its shards under FSDP), keyed by parameter
    name so that any world size can read them: {'model': ..., 'optimizer': AdamW's per-parameter state}.
    The optimizer's hyperparameters stay out: a resume takes them from its own settings. Also returns the
    param_groups that set_state_dict needs with them."""
    if optimizer is None:
        return {"model": get_state_dict(model, [], options=SHARDED)[0]}, []
    model_sd, optim_sd = get_state_dict(model, optimizer, options=SHARDED)
    return {"model": model_sd, "optimizer": optim_sd["state"]}, optim_sd["param_groups"]


def load_training_state(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """
    Restore `model` (and `optimizer`'s moments) from the sharded checkpoint at `path`, whatever the world size
    it was written with and whatever this one is: FSDP on any number of processes, DDP, or one process.
    Every process of the group calls it. Returns the values of checkpoint.json.
    """
    index = read_index(path)
    state, param_groups = training_state(model, optimizer)
    load_into(path, state, index)
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={}, options=SHARDED)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict={"state": state["optimizer"], "param_groups": param_groups}, options=SHARDED)
    return {k: v for k, v in index.items() if k != "shards"}


class ShardedCheckpointer:
    """
    Writes sharded checkpoints, on every process of the run, synchronously or asynchronously. An asynchronous
    save copies this process's shards to memory (the state of its step, whatever training does next), then
    writes them in a background thread over a process group of its own (gloo), so training's collectives
    never interleave with the checkpoint's; the next save, wait() or close() waits for it. A checkpoint
    becomes the current one (checkpoint.json switched) only once every process has written its shards.
    """

    def __init__(self, asynchronous: bool = False):
        self.asynchronous = asynchronous
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.group = dist.new_group(backend="gloo") if self.distributed and asynchronous else None
        self.committer = ThreadPoolExecutor(max_workers=1) if asynchronous else None
        self.pending: Future | None = None
        self.pending_target: tuple[str, int] | None = None  # the pending save's path and size, for its error

    def save(self, path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, values: dict,
             replaces: str | None = None) -> None:
        """Write the state of `model` (and `optimizer`) with `values` (JSON) as the sharded checkpoint `path`; once
        it is the current one, remove the one-file checkpoint `replaces` (an older state in the other format).
        Returns once it is written, or, asynchronous, once this process's shards are copied."""
        self.wait()
        values = json.loads(json.dumps(dict(values, with_optimizer=optimizer is not None)))  # as they are now, as JSON
        step_name = self._new_step_name(values.get("iter_num", 0))
        folder = os.path.join(path, step_name)
        if self.rank == 0:
            self._remove_unused_steps(path, keep=None)  # what a crash mid-save left behind
        if self.distributed:
            dist.barrier()
        state, _ = training_state(model, optimizer)
        writer = dcp.FileSystemWriter(folder)
        needed = tensor_bytes(state)  # a DTensor counts whole: what every process's shards need together
        if not self.asynchronous:
            try:
                dcp.save(state, storage_writer=writer, no_dist=alone())
                self._commit(path, step_name, values, replaces)
            except (dcp.api.CheckpointException, OSError) as e:
                raise self._unwritten(path, e, needed) from None
            return
        single = {"no_dist": True} if alone() else {}  # async_save takes no_dist only from torch 2.9 on
        written = dcp.async_save(state, storage_writer=writer, process_group=self.group, **single)
        upload = getattr(written, "upload_completion", written)  # a Future, or an AsyncSaveResponse's upload
        self.pending = self.committer.submit(self._commit_when_written, upload, path, step_name, values, replaces)
        self.pending_target = (path, needed)

    def wait(self) -> None:
        """Block until the save in progress (if any) is written and switched to; re-raise what it failed with."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            try:
                pending.result()
            except (dcp.api.CheckpointException, OSError) as e:
                raise self._unwritten(self.pending_target[0], e, self.pending_target[1]) from None

    def _unwritten(self, path: str, error: BaseException, needed: int) -> BaseException:
        """A save that failed: its step folder removed (rank 0), and a full disk or a refused folder turned into
        the one line durable.unwritable says; anything else is returned as it is, a bug to see whole."""
        if self.rank == 0:
            self._remove_unused_steps(path, keep=None)
        causes = [f[0] for f in error.failures.values()] if isinstance(error, dcp.api.CheckpointException) else [error]
        for cause in causes:
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                try:
                    return unwritable(path, cause, needed)
                except OSError:
                    break  # not a full disk or a refused folder
        return error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self.committer is not None:
                self.committer.shutdown()
            if self.group is not None:
                dist.destroy_process_group(self.group)
                self.group = None

    def _commit_when_written(self, upload: Future, path: str, step_name: str, values: dict, replaces: str | None) -> None:
        upload.result()
        self._commit(path, step_name, values, replaces)

    def _new_step_name(self, step: int) -> str:
        """A folder name no earlier save used (a step saved again after a restart gets a new one), the same on
        every process: rank 0's clock, shared."""
        name = [f"{STEP_PREFIX}{step:08d}-{time.time_ns():x}"]
        if self.distributed:
            dist.broadcast_object_list(name, src=0)
        return name[0]

    def _commit(self, path: str, step_name: str, values: dict, replaces: str | None = None) -> None:
        """Rank 0, once every process's shards are written (DCP's save returns after its metadata, which it
        writes last): point checkpoint.json at them, atomically and durably, then drop the step it replaced.
        A synchronous save shares rank 0's failure with every process, so none waits for it at the next step."""
        on_rank_0_for_all(partial(self._switch, path, step_name, values, replaces), catch=OSError, share=not self.asynchronous)

    def _switch(self, path: str, step_name: str, values: dict, replaces: str | None) -> None:
        index = json.dumps(dict(values, shards=step_name)).encode()
        write_atomically(os.path.join(path, INDEX_NAME), lambda f: f.write(index))
        self._remove_unused_steps(path, keep=step_name)
        if replaces is not None and os.path.isfile(replaces):
            os.remove(replaces)

    @staticmethod
    def _remove_unused_steps(path: str, keep: str | None) -> None:
        """Remove the step folders checkpoint.json does not name (keep: the one it now names)."""
        if not os.path.isdir(path):
            return
        if keep is None:
            index_path = os.path.join(path, INDEX_NAME)
            try:
                with open(index_path, encoding="utf-8") as f:
                    keep = json.load(f)["shards"]
            except FileNotFoundError:
                keep = None
            except (OSError, ValueError, KeyError, TypeError):
                return  # a damaged index: leave every folder for whoever repairs it
        for name in os.listdir(path):
            if name.startswith(STEP_PREFIX) and name != keep:
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def alone() -> bool:
    """No process group: DCP is told to save or load in this one process."""
    return not (dist.is_available() and dist.is_initialized())

