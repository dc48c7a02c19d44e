"""
Trains a GPT on one device, or on many through torchrun, with DDP (the default) or FSDP2.

    python train.py config/train_shakespeare_char_cpu.py          # one device: cuda, mps or cpu
    python train.py config/train_shakespeare_char.py --max_iters=2000 --rope=True
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py                 # DDP
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --fsdp=True     # FSDP2

Every setting below can be changed by a config file or --key=value (configurator.py).
The global batch of step k is a pure function of (seed, k), and the dropout of its micro-batch j a pure
function of (seed, k, j), so runs are reproducible, resume exactly and train alike on any number of processes.

A run's files: out_dir/ckpt.pt, the state to continue from (every evaluation, and on a stop request), and
out_dir/best.pt, the best-validated weights (only when the validation loss improves; nothing replaces it
with worse). --init_from=auto is one command for the first launch and every relaunch; a torchrun restart or
a SLURM requeue of any run continues it. Exit status: 0 finished, 1 an error (one line), 75 stopped on a
signal (SIGTERM, SIGINT, SIGUSR1) with a checkpoint to resume from.
"""

import gc
import errno
import os
import sys
import json
import math
import time
import signal
import threading
import traceback
import uuid
import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from model import (GPT, GPTConfig, ConfigError, ATTENTION_IMPLS, GPT2_NAMES, PADDED_GPT2_VOCAB_SIZE, is_on_meta,
                   materialise_sharded)
from configurator import read_settings
from optimizers import OptimizerGroup, muon_available
from eval_hellaswag import load_hellaswag, evaluate_hellaswag, example_rows
from common import (UserError, run_main, range_check, pick_device, pick_dtype, autocast_context, checkpoint_path,
                    save_checkpoint, load_checkpoint, new_model, load_trained, load_pretrained, read_char_vocab, ends_inside_a_line,
                    is_character_vocabulary, estimate_mfu, get_tokenizer, unwritable, current_checkpoint, sharded_path,
                    remove_sharded_twin)

# -----------------------------------------------------------------------------
# default config: GPT-2 small (124M) on OpenWebText
# I/O
out_dir = "out"
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # evaluate once and exit
# Every evaluation writes out_dir/ckpt.pt, the state to continue from (so a crash loses at most the steps since
# the last evaluation, a stop request none), and out_dir/best.pt, the weights alone, when the validation loss
# improves on every earlier one; nothing ever replaces a better-validated best.pt.
# init_from: 'scratch' | 'resume' (out_dir/ckpt.pt must exist) | 'auto' (resume when out_dir/ckpt.pt exists, else
# start from auto_from: one command for the first launch and every relaunch) | 'gpt2' ... 'gpt2-xl' | a local HF
# folder. A torchrun restart or a SLURM requeue of a run, whatever it started from, resumes from out_dir/ckpt.pt.
init_from = "scratch"
auto_from = "scratch"  # what init_from='auto' starts from when out_dir holds no checkpoint: 'scratch', a GPT-2 name or a HF folder
# logging
wandb_log = False
wandb_project = "owt"
wandb_run_name = "gpt2"
# data
dataset = "openwebtext"
data_root = "data"  # the bins are in data_root/dataset/{train,val}.bin
gradient_accumulation_steps = 5 * 8  # global: micro-steps per optimizer step, summed over all processes
batch_size = 12  # sequences per micro-step per process
# model: GPTConfig's fields (model.py) with its defaults, all but vocab_size, which comes from the data
# (meta.json's for a character set, GPT-2's padded BPE otherwise)
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True  # biases in Linears and LayerNorms, as GPT-2
rope = False  # rotary position embedding instead of the learned position table
rope_theta = 10000.0
n_kv_head = None  # None: n_head (multi-head attention); fewer: grouped-query attention
window = None  # None: full causal attention; W: each token sees itself and W-1 before it; a tuple: one per layer
qk_norm = False  # RMS-normalise each query and key head before attention (modded-nanogpt, Qwen3)
mlp_act = "gelu"  # 'gelu' | 'relu2' (relu(x)**2)
attn_impl = "auto"  # 'auto' | 'dense' | 'blocked' | 'flex' for windowed layers
# optimizer: 'adamw' for every parameter, or 'muon': Muon for the weight matrices inside the blocks, AdamW for
# the embeddings (and the tied lm_head), norms and biases
optimizer = "adamw"
learning_rate = 6e-4  # AdamW's peak learning rate
max_iters = 600000
weight_decay = 1e-1  # AdamW's, on matrices and embeddings
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables clipping (all parameters, before either optimizer steps)
muon_lr = 0.02  # Muon's peak learning rate; the schedule scales it by the same factor as learning_rate
muon_momentum = 0.95  # Nesterov momentum
muon_ns_steps = 5  # Newton-Schulz iterations per update
muon_weight_decay = 0.0  # decoupled, as AdamW's: each step multiplies the matrices by 1 - lr * muon_weight_decay
# learning-rate schedule: linear warmup, then cosine decay to min_lr; decay_lr=False keeps learning_rate throughout.
# Muon's follows the same curve from muon_lr down to min_lr * muon_lr / learning_rate
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000
min_lr = 6e-5
# HellaSwag during training (GPT-2 BPE models): every hellaswag_interval steps and at the end; 0 is off
hellaswag_interval = 0
hellaswag_path = os.path.join("data", "hellaswag", "hellaswag_val.jsonl")
hellaswag_max_examples = 0  # 0: all of them
# distributed
fsdp = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
fsdp_cpu_offload = False
# FSDP writes its checkpoints in shards, each process its own (ckpt.dcp/, best.dcp/); async_checkpoint=True writes
# them in the background while training goes on (each process holds a copy of its shards meanwhile)
async_checkpoint = False
grad_checkpoint = False  # recompute activations block by block in backward: less memory, ~1/3 more compute
# system
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
dtype = "auto"  # 'auto' | 'float32' | 'bfloat16' | 'float16'
compile = None  # None: on for CUDA only
seed = 1337
# -----------------------------------------------------------------------------

# the settings above that are GPTConfig fields; tests/test_configurator.py checks that this is all of them
MODEL_SETTINGS = ("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "rope", "rope_theta", "n_kv_head", "window",
                  "qk_norm", "mlp_act")


def validate_settings(settings):
    """Every setting with a meaningful range, checked before any work is done or any file written.
    A rule about a setting that only matters under another one applies only under it."""
    need = range_check(vars(settings))
    for key in ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size"):
        need(getattr(settings, key) >= 1, key, "use an integer >= 1")
    need(settings.max_iters >= 0, "max_iters", "use an integer >= 0")
    need(math.isfinite(settings.learning_rate) and settings.learning_rate > 0, "learning_rate", "use a positive number")
    if settings.decay_lr:  # the schedule's settings; without decay the learning rate is learning_rate throughout
        need(settings.warmup_iters >= 0, "warmup_iters", "use an integer >= 0")
        need(settings.lr_decay_iters >= 1, "lr_decay_iters", "use an integer >= 1")
        need(math.isfinite(settings.min_lr) and 0 <= settings.min_lr <= settings.learning_rate, "min_lr",
             f"use a number in [0, learning_rate={settings.learning_rate}]")
        need(settings.lr_decay_iters >= settings.warmup_iters, "lr_decay_iters",
             f"use at least warmup_iters={settings.warmup_iters}: the cosine decay starts where the warmup ends")
    need(math.isfinite(settings.weight_decay) and settings.weight_decay >= 0, "weight_decay", "use a number >= 0")
    need(settings.optimizer in OPTIMIZERS, "optimizer", f"use one of {', '.join(OPTIMIZERS)}")
    if settings.optimizer == "muon":  # Muon's settings; with AdamW alone they are unused
        if not muon_available():
            raise UserError(f"--optimizer=muon needs torch.optim.Muon (PyTorch >= 2.9), this is PyTorch {torch.__version__}; "
                            f"upgrade torch or use --optimizer=adamw")
        need(math.isfinite(settings.muon_lr) and settings.muon_lr > 0, "muon_lr", "use a positive number")
        need(0 <= settings.muon_momentum < 1, "muon_momentum", "use a number in [0, 1)")
        need(isinstance(settings.muon_ns_steps, int) and 1 <= settings.muon_ns_steps <= 99, "muon_ns_steps",
             "use an integer in [1, 99] (5 is Muon's usual)")
        need(math.isfinite(settings.muon_weight_decay) and settings.muon_weight_decay >= 0, "muon_weight_decay",
             "use a number >= 0")
    for key in ("beta1", "beta2"):
        need(0 <= getattr(settings, key) < 1, key, "use a number in [0, 1)")
    need(math.isfinite(settings.grad_clip) and settings.grad_clip >= 0, "grad_clip", "use a number > 0, or 0 to disable clipping")
    need(0 <= settings.seed < 2**63, "seed", "use an integer in [0, 2**63)")
    need(settings.compile in (None, True, False), "compile", "use True, False or None (None: on for CUDA only)")
    need(not (settings.attn_impl == "flex" and settings.dropout > 0 and settings.window is not None), "attn_impl",
         "the flex kernel has no dropout; use --attn_impl=blocked (or auto) with dropout, or --dropout=0")
    need(settings.attn_impl in ATTENTION_IMPLS, "attn_impl", f"use one of {', '.join(ATTENTION_IMPLS)}")
    need(settings.out_dir != "", "out_dir", "give a folder name")
    need(settings.dataset not in ("", ".", "..") and os.sep not in settings.dataset, "dataset", "give the name of a folder under data_root")
    need(not settings.fsdp_cpu_offload or settings.fsdp, "fsdp_cpu_offload", "it needs --fsdp=True")
    need(not settings.async_checkpoint or settings.fsdp, "async_checkpoint",
         "it needs --fsdp=True (one process and DDP write one file, synchronously)")
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
    if settings.hellaswag_interval:
        need(settings.hellaswag_interval >= 0, "hellaswag_interval", "use an integer >= 0 (0 is off)")
        need(settings.hellaswag_max_examples >= 0, "hellaswag_max_examples", "use an integer >= 0 (0: all of them)")
        if not os.path.isfile(settings.hellaswag_path):
            raise UserError(f"--hellaswag_interval={settings.hellaswag_interval} but there is no {settings.hellaswag_path}; "
                            f"download it with python data/hellaswag/prepare.py, or set --hellaswag_interval=0")
    if settings.wandb_log:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--wandb_log=True needs the wandb package: pip install wandb, or set --wandb_log=False") from None


OPTIMIZERS = ("adamw", "muon")


def lr_at(step, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr=True):
    """Linear warmup over warmup_iters steps, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not decay_lr:
        return learning_rate
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step > lr_decay_iters:
        return min_lr
    ratio = (step - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# -----------------------------------------------------------------------------
# the batch stream

TRAIN_STREAM = 0
EVAL_STREAMS = {"train": 1, "val": 2}  # the fixed evaluation batches of each split
DROPOUT_STREAM = 3  # keeps dropout seeds apart from the batch streams


class BatchStream:
    """
    Rows of block_size + 1 tokens from data_dir/{train,val}.bin at offsets that are a pure function of
    (seed, stream, index): TRAIN_STREAM is training (index = step), EVAL_STREAMS the fixed evaluation batches
    of each split. Every process computes the whole global batch's offsets and takes its slice.
    """

    def __init__(self, data_dir, block_size, seed, vocab_size):
        self.data_dir, self.block_size, self.seed, self.vocab_size = data_dir, block_size, seed, vocab_size

    def path(self, split):
        return os.path.join(self.data_dir, f"{split}.bin")

    def tokens(self, split):
        # a fresh memmap per batch avoids the memory growth of keeping one open (nanoGPT's note)
        return np.memmap(self.path(split), dtype=np.uint16, mode="r")

    def check(self):
        """All data problems a user can cause, found before any work is done."""
        dataset = os.path.basename(os.path.normpath(self.data_dir))
        for split in ("train", "val"):
            path = self.path(split)
            if not os.path.exists(path):
                raise UserError(f"no {split} data at {path}; prepare it first with: python data/{dataset}/prepare.py")
            size = os.path.getsize(path)
            if size % 2:  # uint16 tokens: an odd size is a file cut short or not a token file at all
                raise UserError(f"{path} is {size:,} bytes, not a whole number of 2-byte tokens: it is cut short or "
                                f"not a token file; prepare it again with python data/{dataset}/prepare.py")
            n = size // 2
            if n < self.block_size + 1:
                raise UserError(f"{path} has {n} tokens, fewer than block_size + 1 = {self.block_size + 1}; "
                                f"use a smaller --block_size or more data")
            if n <= 200_000_000:  # a full scan is quick below this size; larger sets are checked batch by batch
                top = int(self.tokens(split).max())
                if top >= self.vocab_size:
                    raise UserError(f"{path} holds token id {top}, not below the model's vocab_size {self.vocab_size}: "
                                    f"the data and the model disagree; prepare the data again with python data/{dataset}/prepare.py")

    def offsets(self, stream, index, rows, split):
        n_tokens = len(self.tokens(split))
        return np.random.default_rng([self.seed, stream, index]).integers(0, n_tokens - self.block_size, size=rows)

    def rows(self, split, offsets):
        """(inputs, targets) as int64 tensors of shape (len(offsets), block_size)."""
        data = self.tokens(split)
        x = np.stack([data[o:o + self.block_size] for o in offsets]).astype(np.int64)
        y = np.stack([data[o + 1:o + 1 + self.block_size] for o in offsets]).astype(np.int64)
        if x.max() >= self.vocab_size or y.max() >= self.vocab_size:
            raise UserError(f"{self.path(split)} holds a token id >= vocab_size {self.vocab_size}; prepare the data again")
        return torch.from_numpy(x), torch.from_numpy(y)


def dropout_seed(seed, step, micro_batch):
    """The seed of the dropout masks of global micro-batch `micro_batch` of `step`, whichever process runs it."""
    entropy = [seed, DROPOUT_STREAM, step, micro_batch]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


# -----------------------------------------------------------------------------
# processes

@dataclass
class Processes:
    """This process's place among the training processes."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    distributed: bool = False  # launched by torchrun, with a process group

    @property
    def master(self):
        return self.rank == 0


def processes_from_env():
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; no RANK means one process."""
    if "RANK" not in os.environ:
        return Processes()
    return Processes(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]), True)


def gather_from_every_rank(value, processes):
    """[value of rank 0, value of rank 1, ...]; [value] when alone."""
    if not processes.distributed:
        return [value]
    values = [None] * processes.world_size
    dist.all_gather_object(values, value)
    return values


def init_process_group(processes, device_type):
    """Join the group of this launch attempt (attempt_store), on NCCL for CUDA, gloo otherwise."""
    if not processes.distributed:
        return
    agent_store, rank, world_size = next(dist.rendezvous("env://"))
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = attempt_store(agent_store, rank) if shared else agent_store
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", store=store, rank=rank, world_size=world_size)
    if shared:
        # every process has found this attempt's store, so its entry can go: the next attempt's processes then wait
        # for their own rank 0's entry instead of trying this one's dead store first
        dist.barrier()
        if rank == 0:
            agent_store.delete_key(ATTEMPT_KEY)


ATTEMPT_KEY = "train.py/attempt_store"  # in the torchrun agent's store: "<port> <token>" of the current attempt's store
ATTEMPT_WAIT = 600  # seconds a process waits for rank 0 of its attempt to publish the store


def attempt_store(agent_store, rank):
    """
    A store that only the processes of this launch attempt share. torchrun's agent store outlives a restart
    of the worker group (--max-restarts), keys included, and the nodes need not agree on their restart count
    (torchrun does not count a membership change as a restart), so neither the store nor a prefix from the
    count can tell attempts apart. Instead rank 0 serves a fresh store and publishes its port with a random
    token; the others take the published store once it answers with that token. An entry left by an earlier
    attempt points at a store that died with that attempt's rank 0 (every process of an attempt is stopped
    before the next one starts), or answers with another token, so every process of an attempt meets in
    the same store.
    """
    from datetime import timedelta
    host = os.environ["MASTER_ADDR"]
    if rank == 0:
        token = uuid.uuid4().hex
        store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=ATTEMPT_WAIT))
        store.set("token", token)
        agent_store.set(ATTEMPT_KEY, f"{store.port} {token}")
        return store
    deadline = time.monotonic() + ATTEMPT_WAIT
    while True:
        port, token = agent_store.get(ATTEMPT_KEY).decode().split()
        try:
            store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=5))
            if store.get("token").decode() == token:
                store.set_timeout(timedelta(seconds=ATTEMPT_WAIT))
                return store
        except (RuntimeError, OSError):  # a store of an earlier attempt, gone: rank 0 has not published yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 of this attempt published no store in {ATTEMPT_WAIT} s")
        time.sleep(0.2)


STOPPED_EXIT = 75  # EX_TEMPFAIL, "try again later": stopped on request with a checkpoint to resume from (0: finished, 1: an error)
STUCK_AFTER = 10  # seconds a stop signal may wait for the main thread before the process exits without a checkpoint
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class StopRequest:
    """
    SIGTERM, SIGINT and SIGUSR1 (SLURM's --signal=USR1@N) ask for a checkpoint at the next safe point: a step
    boundary, between evaluation or HellaSwag batches, or right after a checkpoint being written. Run alone,
    a second signal exits at once. Under torchrun a second one is the same request arriving again (scancel
    or Ctrl-C reach every worker directly and again through the agent), so it is not taken for "exit now":
    torchrun kills what is still running after its grace period anyway.
    """
    requested = False
    under_torchrun = False
    handled_at = -math.inf  # when the handler last ran (time.monotonic): the main thread was running Python code

    @classmethod
    def install(cls, under_torchrun):
        cls.requested, cls.under_torchrun = False, under_torchrun
        for signum in STOP_SIGNALS:
            signal.signal(signum, cls.handle)
        if under_torchrun:
            cls.watch_for_a_blocked_main_thread()

    @classmethod
    def watch_for_a_blocked_main_thread(cls):
        """
        Python runs a signal handler in the main thread, between two bytecodes. A process blocked in a collective
        whose peers are gone (torchrun tearing the group down after a worker died, NCCL, a peer on a lost node)
        never gets there, so it would sit out torchrun's grace period until SIGKILL. The interpreter also writes
        each signal to a wakeup file descriptor at once, from C; a thread reading it exits the process when the
        handler has not run STUCK_AFTER seconds later. A healthy run reaches Python within milliseconds.
        """
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd)

        def watch():
            while True:
                signum = os.read(read_fd, 1)[0]
                arrived = time.monotonic()
                while cls.handled_at < arrived - 1.0:  # 1 s of slack: the handler may have run just before the read
                    if time.monotonic() - arrived > STUCK_AFTER:
                        os.write(2, f"\n{signal.Signals(signum).name}: the training process is blocked outside Python "
                                    f"(a collective whose peers are gone); exiting now\n".encode())
                        os._exit(128 + signum)
                    time.sleep(0.1)
        threading.Thread(target=watch, name="stop-watch", daemon=True).start()

    @classmethod
    def handle(cls, signum, frame):
        # os.write, not print: a handler that prints while the main thread prints can raise "reentrant call"
        name = signal.Signals(signum).name
        cls.handled_at = time.monotonic()
        if cls.requested:
            if cls.under_torchrun:
                return
            os.write(2, f"\nsecond {name}: exiting now without a checkpoint\n".encode())
            os._exit(128 + signum)
        cls.requested = True
        os.write(2, f"\n{name} received: will save a checkpoint and stop at the next step boundary or evaluation batch\n".encode())


class StopAgreed(Exception):
    """Every process has seen a stop request: raised at a safe point between batches, caught by the training loop."""


def check_stop(processes, device):
    """Raise StopAgreed when any process has a stop request. Every process must call it at the same points
    (it is a collective under torchrun), so all of them stop at the same batch."""
    requested = StopRequest.requested
    if processes.distributed:
        flag = torch.tensor([float(requested)], device=device)
        dist.all_reduce(flag)
        requested = flag.item() > 0
    if requested:
        raise StopAgreed


class RunLog:
    """Console lines and out_dir/metrics.jsonl (appended, never truncated), plus wandb when asked, from rank 0 only."""

    def __init__(self, out_dir, active, wandb_settings=None):
        self.active, self.fd, self.wandb = active, None, None
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if not active:
            return
        os.makedirs(out_dir, exist_ok=True)
        torn = ends_inside_a_line(self.path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # unbuffered: a failed write is known at once
        if torn:
            os.write(self.fd, b"\n")
            print(f"{self.path} ends in a record a crash cut short: the next one starts on a line of its own", file=sys.stderr)
        if wandb_settings is not None:
            import wandb
            self.wandb = wandb
            wandb.init(**wandb_settings)

    def print(self, text):
        if self.active:
            print(text, flush=True)

    def metrics(self, record):
        if not self.active:
            return
        # strict JSON: an overflowing float16 step has an inf gradient norm, written as null, not Infinity
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        size = os.fstat(self.fd).st_size
        try:
            if os.write(self.fd, line) != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:  # a full disk: one line saying so, and no torn last record
            os.ftruncate(self.fd, size)
            raise unwritable(self.path, e, len(line)) from None
        if self.wandb is not None:
            self.wandb.log(record, step=record["iter"])

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


# -----------------------------------------------------------------------------
# the model: built, loaded, wrapped

def data_vocabulary(data_dir):
    """(vocab_size, character list or None): a character set's meta.json, else GPT-2's padded BPE."""
    meta_path = os.path.join(data_dir, "meta.json")
    if os.path.exists(meta_path):
        return read_char_vocab(meta_path)
    return PADDED_GPT2_VOCAB_SIZE, None


def model_args(settings, vocab_size):
    return dict({key: getattr(settings, key) for key in MODEL_SETTINGS}, vocab_size=vocab_size)


def check_model_settings(settings, vocab_size):
    try:
        GPTConfig(**model_args(settings, vocab_size))
    except ConfigError as e:
        raise UserError(str(e)) from None


def restart_count():
    """How many times the launcher has started this run again: torchrun's --max-restarts count, or SLURM's
    requeue count (which torchrun's workers inherit); 0 for a first launch."""
    return max(int(os.environ.get(name, "0") or 0) for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def resolve_init_from(settings, ckpt_path, processes):
    """
    Where this launch starts: 'resume' when some process's out_dir holds the run's checkpoint and the launch is
    init_from=auto or any restart (a torchrun restart or a SLURM requeue of a run that began from scratch, a
    GPT-2 name or a folder continues that run: starting over would overwrite its progress); otherwise
    init_from, or auto_from for 'auto'.
    """
    fresh = settings.auto_from if settings.init_from == "auto" else settings.init_from
    if settings.init_from == "resume" or (settings.init_from != "auto" and restart_count() == 0):
        return settings.init_from
    found = any(gather_from_every_rank(current_checkpoint(ckpt_path) is not None, processes))
    if found and settings.init_from != "auto" and processes.master:
        print(f"restart {restart_count()} of a run that began from {fresh}: resuming from {ckpt_path} instead of starting over",
              file=sys.stderr, flush=True)
    return "resume" if found else fresh


def checkpoint_step(path):
    """The step of the checkpoint at `path`, read without loading its tensors (memory-mapped); None when there
    is none, -1 when it cannot be read (loading it reports why, if no process has a better one)."""
    if not os.path.exists(path):
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["iter_num"])
    except Exception:  # damaged, or not train.py's: any readable copy elsewhere is better
        return -1


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


HANDOVER_CHUNK = 64 * 2**20  # bytes per broadcast when a checkpoint goes to processes that lack it


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


TRAINING_KEYS = ("optimizer", "iter_num", "best_val_loss", "config")
ARCHITECTURE_SETTINGS = tuple(key for key in MODEL_SETTINGS if key != "dropout")  # dropout may change on resume


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


def build_model(settings, assigned, init_from, vocab_size, chars, processes):
    """(model on the CPU, checkpoint or None) for a run starting from init_from, checked against the data.
    `assigned`: the settings the user set (configurator), which a resume must not contradict."""
    ckpt_path = checkpoint_path(settings.out_dir)
    torch.manual_seed(settings.seed)  # the same initial weights on every process (FSDP shards them where they are)
    on_meta = processes.distributed and settings.fsdp  # FSDP: built without storage, sharded, then materialised
    if init_from == "resume":
        shards = sharded_resume_source(ckpt_path, processes)
        if shards is not None:  # only the values now; each process reads its part once the model is sharded
            from sharded_checkpoint import read_index
            checkpoint = dict(read_index(shards), shards=shards)
            missing = [k for k in ("with_optimizer", *TRAINING_KEYS[1:]) if k not in checkpoint]
            if missing:
                raise UserError(f"{shards} holds a model but not a training run (no {', '.join(missing)}); export it "
                                f"and start from the folder with --init_from=<folder>")
            adopt_checkpoint_settings(settings, assigned, checkpoint, shards)
            if checkpoint.get("chars") != chars or (is_character_vocabulary(vocab_size)
                                                    and checkpoint["model_args"]["vocab_size"] != vocab_size):
                raise UserError(f"{shards} was trained on another vocabulary than {settings.dataset}'s; resume it on its "
                                f"own data set ({checkpoint['config'].get('dataset', '?')})")
            with torch.device("meta") if on_meta else contextlib.nullcontext():
                return new_model(checkpoint["model_args"]), checkpoint
        checkpoint = read_checkpoint_everywhere(ckpt_path, processes)
        missing = [k for k in TRAINING_KEYS if k not in checkpoint]
        if missing:
            raise UserError(f"{ckpt_path} holds a model but not a training run (no {', '.join(missing)}); start from it "
                            f"with --init_from=scratch and load it elsewhere, or export it and use --init_from=<folder>")
        adopt_checkpoint_settings(settings, assigned, checkpoint, ckpt_path)
        loaded = load_trained(settings.out_dir, checkpoint=checkpoint, need_decoding=False)
        other_char_count = is_character_vocabulary(vocab_size) and loaded.model.config.vocab_size != vocab_size
        if checkpoint.get("chars") != chars or other_char_count:
            raise UserError(f"{ckpt_path} was trained on another vocabulary than {settings.dataset}'s; resume it on its own "
                            f"data set ({checkpoint['config'].get('dataset', '?')})")
        return loaded.model, checkpoint
    if init_from == "scratch":
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            return new_model(model_args(settings, vocab_size)), None
    overrides = {k: getattr(settings, k) for k in GPTConfig.PRETRAINED_OVERRIDES if getattr(settings, k) is not None}
    loaded = load_pretrained(init_from, overrides, need_decoding=False)
    if settings.rope and not loaded.model.config.rope:  # the source decides the position encoding; it cannot be switched
        raise UserError(f"{init_from} uses learned positions; --rope=True needs init_from=scratch or a rotary model")
    if loaded.chars != chars:
        kind = lambda c: "GPT-2 BPE" if c is None else f"a {len(c)}-character vocabulary"
        raise UserError(f"{init_from} reads {kind(loaded.chars)} but {settings.dataset} is in {kind(chars)}; "
                        f"fine-tune it on data in its own tokens")
    return loaded.model, None


def wrap_model(model, processes, settings, device_type, ptdtype):
    """DDP or FSDP2 under torchrun. Returns (wrapped module, autocast dtype): FSDP2 runs bf16 itself."""
    if not processes.distributed:
        return model, ptdtype
    if settings.fsdp:
        from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy
        shard_args = {}
        if ptdtype == "bfloat16":  # bf16 compute, fp32 gradient reduction and master weights
            shard_args["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            ptdtype = "float32"  # the parameters are bf16 already: no autocast on top
        if settings.fsdp_cpu_offload:
            shard_args["offload_policy"] = CPUOffloadPolicy(pin_memory=device_type == "cuda")
        for block in model.transformer.h:
            fully_shard(block, **shard_args)
        fully_shard(model, **shard_args)
        return model, ptdtype
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[processes.local_rank] if device_type == "cuda" else None), ptdtype


def build_optimizer(model, settings, device_type):
    """AdamW, or AdamW and Muon (model.configure_optimizers), with this run's settings; FSDP's sharded parameters
    take AdamW's per-tensor implementation."""
    muon = None
    if settings.optimizer == "muon":
        muon = dict(lr=settings.muon_lr, momentum=settings.muon_momentum, ns_steps=settings.muon_ns_steps,
                    weight_decay=settings.muon_weight_decay)
    return model.configure_optimizers(settings.weight_decay, settings.learning_rate, (settings.beta1, settings.beta2),
                                      device_type, fused=False if settings.fsdp else None, muon=muon)


def set_learning_rates(optimizer, step, settings):
    """Every param group at `step` of the schedule, from its own peak_lr: AdamW's groups follow lr_at exactly,
    Muon's the same curve scaled by muon_lr / learning_rate. Returns AdamW's (the logged lr)."""
    for group in optimizer.param_groups:
        ratio = group["peak_lr"] / settings.learning_rate  # 1.0 exactly for AdamW's groups
        group["lr"] = lr_at(step, group["peak_lr"], settings.warmup_iters, settings.lr_decay_iters,
                            settings.min_lr * ratio, settings.decay_lr)
    return lr_at(step, settings.learning_rate, settings.warmup_iters, settings.lr_decay_iters, settings.min_lr,
                 settings.decay_lr)


@dataclass
class TrainState:
    """What training needs at every step, built once by start_training."""
    settings: SimpleNamespace
    model: GPT  # the model itself: its parameters, the optimizer's, checkpoints, HellaSwag at any length
    wrapped: torch.nn.Module  # the DDP/FSDP module around it (the model itself on one process): gradient sync
    runner: torch.nn.Module  # what runs the training and evaluation batches: `wrapped`, compiled when compile is on
    optimizer: torch.optim.Optimizer | OptimizerGroup  # AdamW, or AdamW and Muon
    scaler: torch.amp.GradScaler
    processes: Processes
    autocast: AbstractContextManager
    device: str
    chars: list | None = None  # the character vocabulary the checkpoints carry
    gradient_bytes: int | None = None  # the most gradient storage this process held in its first step (measured)
    checkpointer: object = None  # FSDP's ShardedCheckpointer (sharded_checkpoint.py); None: one file from rank 0

    @property
    def micro_steps(self):
        """Forward/backward passes per optimizer step on this process."""
        return self.settings.gradient_accumulation_steps // self.processes.world_size

    def set_gradient_sync(self, enabled):
        """DDP reduces gradients on the last micro-step only (the switch is on the DDP module, not a compiled wrapper).
        FSDP reduce-scatters on every micro-step: with sync off between micro-steps FSDP2 would hold every
        parameter's unsharded gradient on every process until the last one, which is the memory sharding saves."""
        if self.processes.distributed and not self.settings.fsdp:
            self.wrapped.require_backward_grad_sync = enabled


# -----------------------------------------------------------------------------
# one optimizer step, evaluation, checkpoints

class StepResult(NamedTuple):
    loss: float  # the mean over all micro-steps and processes
    grad_norm: float | None  # before clipping; None without clipping
    stop_requested: bool  # a process received a stop signal
    skipped: bool  # float16 gradients overflowed, so the scaler skipped the update and lowered its scale


def train_step(state, batches, step):
    """state.micro_steps forward/backward passes on this process's slices of the global batch of `step`,
    then one optimizer step."""
    settings, processes, dev = state.settings, state.processes, state.device
    offsets = batches.offsets(TRAIN_STREAM, step, settings.gradient_accumulation_steps * settings.batch_size, "train")
    loss_sum = torch.zeros((), device=dev)
    measuring = state.gradient_bytes is None  # the first step: how much gradient storage is held, measured
    for micro in range(state.micro_steps):
        state.set_gradient_sync(micro == state.micro_steps - 1)
        micro_batch = processes.rank * state.micro_steps + micro  # its index in the global batch
        start = micro_batch * settings.batch_size
        X, Y = (t.to(dev, non_blocking=True) for t in batches.rows("train", offsets[start:start + settings.batch_size]))
        torch.manual_seed(dropout_seed(settings.seed, step, micro_batch))
        with state.autocast:
            _, loss = state.runner(X, Y)
        loss_sum += loss.detach().float()
        state.scaler.scale(loss / state.micro_steps).backward()
        if measuring:
            state.gradient_bytes = max(state.gradient_bytes or 0, gradient_bytes(state.model))
    # one all-reduce carries the loss sum and the stop flag of every process
    summary = torch.stack([loss_sum, torch.tensor(float(StopRequest.requested), device=dev)])
    if processes.distributed:
        dist.all_reduce(summary)
    step_loss = summary[0].item() / settings.gradient_accumulation_steps
    stop_requested = summary[1].item() > 0
    if not math.isfinite(step_loss) and not state.scaler.is_enabled():  # float16 overflows are the scaler's to skip
        raise diverged("loss", step_loss, step, settings.out_dir)
    grad_norm, skipped = optimizer_step(state)
    return StepResult(step_loss, grad_norm, stop_requested, skipped)


def diverged(what, value, step, out_dir):
    """The error of a run whose loss is no longer a number: nothing is saved, the last good checkpoint stays."""
    kept = ("so the last good checkpoint in " + out_dir + " is kept"
            if current_checkpoint(checkpoint_path(out_dir)) is not None else "and no checkpoint had been written yet")
    return UserError(f"{what} became {value} at step {step}; stopped without saving, {kept}. "
                     f"Try a lower --learning_rate or check the data")


def optimizer_step(state):
    """Clip (the true gradients: unscaled first), step and clear the gradients. Returns (the gradient norm,
    or None without clipping; skipped: the scaler found float16 gradients overflowing and skipped the update)."""
    scaler, optimizer = state.scaler, state.optimizer
    grad_norm = None
    if state.settings.grad_clip != 0.0:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), state.settings.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        grad_norm = grad_norm.item()
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)  # skipped when float16 gradients overflowed; the scaler then lowers its scale
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, scale is not None and scaler.get_scale() < scale


@torch.no_grad()
def estimate_loss(state, batches):
    """Mean loss over eval_iters fixed batches per split, shared out over the processes. Every process
    runs the same number of forwards (FSDP needs all of them in each one). A stop request is honoured
    between batches (StopAgreed)."""
    eval_iters, batch_size, processes, dev = state.settings.eval_iters, state.settings.batch_size, state.processes, state.device
    losses = {}
    state.runner.eval()
    for split, stream in EVAL_STREAMS.items():
        total = torch.zeros(2, device=dev)  # loss sum, batch count
        for j in range(math.ceil(eval_iters / processes.world_size)):
            check_stop(processes, dev)
            i = j * processes.world_size + processes.rank
            offsets = batches.offsets(stream, min(i, eval_iters - 1), batch_size, split)
            X, Y = (t.to(dev) for t in batches.rows(split, offsets))
            with state.autocast:
                _, loss = state.runner(X, Y)
            if i < eval_iters:
                total += torch.stack([loss.float(), torch.ones((), device=dev)])
        if processes.distributed:
            dist.all_reduce(total)
        losses[split] = (total[0] / total[1]).item()
    state.runner.train()
    return losses


def save_run(state, position, evaluated, val_loss=None):
    """
    out_dir/ckpt.pt, the state to continue from at position.step (evaluated=False marks one written on a stop
    request: a resume evaluates that step first), and with val_loss (an improved validation loss) out_dir/best.pt,
    the weights alone. ckpt.pt goes first, so its best_val_loss is never above best.pt's: a crash between the two
    writes may lose the newest best weights, but no later write can replace better ones. Under FSDP every process
    writes its shards (ckpt.dcp/, best.dcp/: sharded_checkpoint.py), asynchronously with async_checkpoint; else
    every process takes part in gathering the state, rank 0 writes, and a file it cannot write (a full disk) ends
    every process with its one line. Returns the paths written.
    """
    settings, processes = state.settings, state.processes
    last, best = checkpoint_path(settings.out_dir, "last"), checkpoint_path(settings.out_dir, "best")
    values = dict(model_args=state.model.config.to_dict(), chars=state.chars, iter_num=position.step, config=vars(settings))
    run_values = dict(evaluated=evaluated, best_val_loss=position.best_val_loss, world_size=processes.world_size)
    position.saved_step = position.step
    if state.checkpointer is not None:
        state.checkpointer.save(sharded_path(last), state.model, state.optimizer, dict(values, **run_values), replaces=last)
        if val_loss is None:
            return [sharded_path(last)]
        state.checkpointer.save(sharded_path(best), state.model, None, dict(values, val_loss=val_loss), replaces=best)
        return [sharded_path(last), sharded_path(best)]

    from torch.distributed.checkpoint.state_dict import get_state_dict, StateDictOptions
    model_sd, optim_sd = get_state_dict(state.model, state.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write():
        save_checkpoint(dict(values, model=model_sd, optimizer=optim_sd, scaler=state.scaler.state_dict(), **run_values), last)
        remove_sharded_twin(last)  # an FSDP run's older state, if this run changed from FSDP
        if val_loss is not None:
            save_checkpoint(dict(values, model=model_sd, val_loss=val_loss), best)
            remove_sharded_twin(best)
    on_rank_0_for_all(write, processes)
    return [last] + ([best] if val_loss is not None else [])


def on_rank_0_for_all(action, processes):
    """action() on rank 0 alone; a UserError there (a full disk, an unwritable folder) is raised on every process
    with the same message (printed once), so none is left waiting in a collective for rank 0."""
    error = None
    if processes.master:
        try:
            action()
        except UserError as e:
            error = str(e)
    if processes.distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error)


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


def local_bytes(tensors):
    """Bytes this process stores for `tensors` (a DTensor's local shard under FSDP)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def gradient_bytes(model):
    """The gradient storage this process holds now: its .grad tensors (their shards under FSDP), and the unsharded
    gradients FSDP2 keeps between micro-steps when its gradient sync is off (on its unsharded parameters, or
    accumulated in the reduce dtype), so that the report shows what is held whatever the sync setting."""
    held = [p.grad for p in model.parameters() if p.grad is not None]
    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if hasattr(module, "_get_fsdp_state") else None
        for fsdp_param in group.fsdp_params if group is not None else ():
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            held += [g for g in (getattr(fsdp_param, "unsharded_accumulated_grad", None), getattr(unsharded, "grad", None))
                     if g is not None]
    return local_bytes(held)


def training_state_bytes(state):
    """Bytes of parameters, gradients (the most held during the first step, measured) and optimizer state held by
    this process (its shards under FSDP)."""
    moments = [v for per_param in state.optimizer.state.values() for v in per_param.values() if torch.is_tensor(v)]
    return dict(params=local_bytes(state.model.parameters()), grads=state.gradient_bytes or 0, optimizer=local_bytes(moments))


def report_training_state(state, log, step):
    held = gather_from_every_rank(training_state_bytes(state), state.processes)
    for rank, parts in enumerate(held):
        log.print(f"rank {rank} holds {sum(parts.values()) / 2**20:,.1f} MiB of training state: " +
                  ", ".join(f"{k} {v / 2**20:,.1f}" for k, v in parts.items()))
    log.metrics(dict(iter=step, state_mib_per_rank=[{k: v / 2**20 for k, v in parts.items()} for parts in held]))


MAX_SKIPPED_STEPS = 20  # float16: this many overflowing steps in a row is divergence, not a scale still settling


def log_step(state, log, step, result, lr, dt):
    settings = state.settings
    tokens_per_sec = settings.gradient_accumulation_steps * settings.batch_size * state.model.config.block_size / dt
    mfu = estimate_mfu(state.model, state.model.config.block_size, tokens_per_sec / state.processes.world_size, state.device)
    record = dict(iter=step, loss=result.loss, lr=lr, grad_norm=result.grad_norm, ms=dt * 1000, tokens_per_sec=tokens_per_sec)
    if mfu is not None:
        record["mfu"] = mfu
    if state.scaler.is_enabled():
        record.update(grad_scale=state.scaler.get_scale(), skipped=result.skipped)
    log.metrics(record)
    mfu_text = f", mfu {mfu * 100:.1f}%" if mfu is not None else ""
    skipped_text = " (float16 overflow: update skipped)" if result.skipped else ""
    log.print(f"iter {step}: loss {result.loss:.4f}, time {dt * 1000:.1f}ms, {tokens_per_sec:,.0f} tok/s{mfu_text}{skipped_text}")


HELLASWAG_CHUNK = 16  # examples per process between two looks at a stop request


def run_hellaswag(state, examples, encode, log, step):
    """evaluate_hellaswag over the examples in chunks, with a stop request honoured between them (StopAgreed);
    every example is scored alone, so the chunks add up to one pass over all of them."""
    # the uncompiled module: every example has its own length, which would recompile a compiled one
    processes, chunk = state.processes, HELLASWAG_CHUNK * state.processes.world_size
    correct, correct_norm = 0, 0
    for start in range(0, len(examples), chunk):
        check_stop(processes, state.device)
        part = examples[start:start + chunk]
        result = evaluate_hellaswag(state.model, part, state.device, state.autocast, encode, processes.rank,
                                    processes.world_size)
        correct += sum(p == e["label"] for p, e in zip(result["pred"], part))
        correct_norm += sum(p == e["label"] for p, e in zip(result["pred_norm"], part))
    n = len(examples)
    log.print(f"step {step}: hellaswag {n} examples, acc {correct / n:.4f}, acc_norm {correct_norm / n:.4f}")
    log.metrics(dict(iter=step, hellaswag_acc=correct / n, hellaswag_acc_norm=correct_norm / n, hellaswag_n=n))


# -----------------------------------------------------------------------------
# set-up and teardown

def check_launch(settings, processes):
    """The settings that depend on how the run was launched, and the device and dtype it runs in."""
    if settings.fsdp and not processes.distributed:
        raise UserError("--fsdp=True needs several processes: launch with torchrun --standalone --nproc_per_node=N train.py --fsdp=True")
    if settings.gradient_accumulation_steps % processes.world_size != 0:
        raise UserError(f"gradient_accumulation_steps={settings.gradient_accumulation_steps} (global) does not divide by the "
                        f"{processes.world_size} processes; use a multiple of {processes.world_size}")
    dev = pick_device(settings.device)
    if processes.distributed and dev.startswith("cuda"):
        dev = f"cuda:{processes.local_rank}"  # one GPU per process, whatever cuda:N was asked for
    ptdtype = pick_dtype(settings.dtype, dev)
    if settings.fsdp and ptdtype == "float16":
        raise UserError("FSDP here uses bfloat16 mixed precision; float16 needs a sharded grad scaler: use --dtype=bfloat16")
    return dev, ptdtype


def read_hellaswag_examples(settings, vocab_size, chars):
    """The HellaSwag examples to score during training, or None when hellaswag_interval is 0."""
    if not settings.hellaswag_interval:
        return None
    if chars is not None or is_character_vocabulary(vocab_size):
        raise UserError("HellaSwag scores English text with the GPT-2 BPE tokenizer; a character-level model "
                        "cannot take it: set --hellaswag_interval=0")
    examples = load_hellaswag(settings.hellaswag_path)
    return examples[:settings.hellaswag_max_examples] if settings.hellaswag_max_examples else examples


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


def start_training(settings, model, processes, dev, ptdtype, chars, initialise=True):
    """The model placed, wrapped and compiled as the settings ask, with a fresh optimizer and scaler. A model FSDP
    built on the meta device gets its shards' storage here, and GPT()'s weights unless a checkpoint will fill
    them (initialise=False)."""
    device_type = dev.split(":")[0]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model.set_attention_impl(settings.attn_impl)
    model.gradient_checkpointing = settings.grad_checkpoint
    if not (processes.distributed and settings.fsdp):
        model.to(dev)  # fully_shard moves each shard to the device itself: no whole model on every GPU first
    wrapped, autocast_dtype = wrap_model(model, processes, settings, device_type, ptdtype)
    if is_on_meta(model):
        torch.manual_seed(settings.seed)  # GPT()'s draws, as one process makes them right after this seed
        materialise_sharded(model, dev, initialise)
    use_compile = settings.compile if settings.compile is not None else device_type == "cuda"
    checkpointer = None
    if processes.distributed and settings.fsdp and out_dir_is_shared(settings.out_dir, processes):
        from sharded_checkpoint import ShardedCheckpointer
        checkpointer = ShardedCheckpointer(asynchronous=settings.async_checkpoint)
    return TrainState(settings, model, wrapped, torch.compile(wrapped) if use_compile else wrapped,
                      build_optimizer(model, settings, device_type),
                      torch.amp.GradScaler(device_type, enabled=ptdtype == "float16"),
                      processes, autocast_context(dev, autocast_dtype), dev, chars, checkpointer=checkpointer)


def log_start(state, log, init_from, step, ptdtype, changes):
    """The start line (and record): how the run is laid out, where it starts, and what a resume changed."""
    settings, processes, model = state.settings, state.processes, state.model
    mode = ("FSDP" if settings.fsdp else "DDP") if processes.distributed else "single process"
    log.print(f"{mode} on {processes.world_size} x {state.device}, {ptdtype}, compile={state.runner is not state.wrapped}; "
              f"model {model.get_num_params() / 1e6:.2f}M parameters; "
              f"{settings.gradient_accumulation_steps * settings.batch_size * model.config.block_size:,} tokens per step; "
              f"init_from={init_from}" + (f" at step {step}" if init_from == "resume" else ""))
    if processes.distributed and settings.fsdp:
        log.print("checkpoints: " + ("sharded, each process writing its own part" +
                                     (" in the background" if settings.async_checkpoint else "")
                                     if state.checkpointer is not None else
                                     "one file gathered on rank 0, written there: out_dir is not on a filesystem every "
                                     "node shares" + (" (async_checkpoint needs one: ignored)" if settings.async_checkpoint else "")))
    if changes:
        log.print("changed since the checkpoint's run: " + ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items()))
    log.metrics(dict(event="start", iter=step, init_from=init_from, world_size=processes.world_size, device=state.device,
                     dtype=ptdtype, params=model.get_num_params(), changed={key: new for key, (_, new) in changes.items()}))
    if step >= settings.max_iters and not settings.eval_only and init_from == "resume":
        log.print(f"the checkpoint is at step {step}, not below --max_iters={settings.max_iters}: nothing to train")


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


def evaluate(state, batches, log, position, lr):
    """Losses on the evaluation batches, logged; then (unless eval_only) ckpt.pt, and best.pt too when the
    validation loss improves. A stop request during it ends it (StopAgreed) before any file is written."""
    settings = state.settings
    losses = estimate_loss(state, batches)
    log.print(f"step {position.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    log.metrics(dict(iter=position.step, train_loss=losses["train"], val_loss=losses["val"], lr=lr))
    if settings.eval_only:
        return
    if not math.isfinite(losses["val"]):  # weights gone bad in the last step: never a checkpoint of them
        raise diverged("validation loss", losses["val"], position.step, settings.out_dir)
    improved = losses["val"] < position.best_val_loss
    position.best_val_loss = min(position.best_val_loss, losses["val"])
    written = save_run(state, position, evaluated=True, val_loss=losses["val"] if improved else None)
    log.print("saved " + " and ".join(written) + (" (val loss improved)" if improved else "")
              + (" (writing in the background)" if state.checkpointer is not None and settings.async_checkpoint else ""))


def stop(state, log, position):
    """A stop request agreed by every process: the checkpoint of this step (unless it was just written), then a note."""
    if position.saved_step != position.step:
        save_run(state, position, evaluated=False)
    if state.checkpointer is not None:
        state.checkpointer.wait()  # written before the process says it stopped
    last = checkpoint_path(state.settings.out_dir)
    log.print(f"stopped at step {position.step} on request; checkpoint saved to "
              f"{sharded_path(last) if state.checkpointer is not None else last}. "
              f"Continue with the same command and --init_from=auto (or --init_from=resume); exit status {STOPPED_EXIT}")


def train_loop(state, batches, log, position, hellaswag):
    """Evaluate when due, then one optimizer step, until max_iters (True) or a stop request (False, a checkpoint
    written). hellaswag: (examples, encode) or None."""
    settings = state.settings
    first_step, skipped_in_a_row, stop_requested, t0 = position.step, 0, False, time.time()
    while True:
        step = position.step
        lr = set_learning_rates(state.optimizer, step, settings)
        last_step = step >= settings.max_iters
        due = lambda interval: (step % interval == 0 or last_step or settings.eval_only) and step != position.evaluated_step
        try:
            if stop_requested:  # nothing but the checkpoint: torchrun and SLURM kill 30 s after their signal
                raise StopAgreed
            if due(settings.eval_interval):
                evaluate(state, batches, log, position, lr)
                check_stop(state.processes, state.device)  # a request that came during the checkpoint write
                t0 = time.time()  # step timings leave evaluation out
            if hellaswag is not None and due(settings.hellaswag_interval):
                run_hellaswag(state, *hellaswag, log, step)
                t0 = time.time()
        except StopAgreed:
            stop(state, log, position)
            return False
        if settings.eval_only or last_step:
            return True

        result = train_step(state, batches, step)
        stop_requested = result.stop_requested
        skipped_in_a_row = skipped_in_a_row + 1 if result.skipped else 0
        if skipped_in_a_row >= MAX_SKIPPED_STEPS:
            raise UserError(f"float16 gradients overflowed {skipped_in_a_row} steps in a row up to step {step} "
                            f"(loss {result.loss}): the run diverged; try a lower --learning_rate "
                            f"or --dtype=bfloat16 on a GPU that has it")
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if step % settings.log_interval == 0:
            log_step(state, log, step, result, lr, dt)
        if step == first_step:  # optimizer state exists now: report what each process holds
            report_training_state(state, log, step)
        position.step += 1


def release(log):
    """Teardown, in an order that matters: the DDP/FSDP module holds the process group, whose destructor joins a
    gloo worker thread; freeing the module first (the caller dropped its references), then the group, keeps
    that out of interpreter shutdown."""
    if sys.exc_info()[2] is not None:  # a failing run: its traceback's frames still hold the module
        traceback.clear_frames(sys.exc_info()[2])
    gc.collect()
    try:
        if log is not None:
            log.close()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# -----------------------------------------------------------------------------

def main():
    assigned = set()  # the settings the user set: a resume must not contradict them
    settings = read_settings(globals(), sys.argv[1:], assigned=assigned)
    processes = processes_from_env()
    validate_settings(settings)
    dev, ptdtype = check_launch(settings, processes)
    data_dir = os.path.join(settings.data_root, settings.dataset)
    vocab_size, chars = data_vocabulary(data_dir)
    ckpt_path = checkpoint_path(settings.out_dir)
    if "scratch" in (settings.init_from, settings.auto_from):  # the settings must make a model, whatever auto decides
        check_model_settings(settings, vocab_size)
    hellaswag_examples = read_hellaswag_examples(settings, vocab_size, chars)

    log, state = None, None
    try:
        init_process_group(processes, dev.split(":")[0])
        if dev.startswith("cuda"):
            torch.cuda.set_device(dev)
        init_from = resolve_init_from(settings, ckpt_path, processes)
        model, checkpoint = build_model(settings, assigned, init_from, vocab_size, chars, processes)
        batches = BatchStream(data_dir, model.config.block_size, settings.seed, model.config.vocab_size)
        batches.check()
        hellaswag = None
        if hellaswag_examples is not None:
            hellaswag = (hellaswag_examples, get_tokenizer().encode)
            for i, example in enumerate(hellaswag_examples):  # an ending the model cannot hold: say so before training
                example_rows(example, hellaswag[1], model.config.block_size, i)
        state = start_training(settings, model, processes, dev, ptdtype, chars, initialise=checkpoint is None)
        position = RunPosition.of(checkpoint, settings.eval_only)
        changes = changed_settings(settings, checkpoint, processes.world_size)
        if checkpoint is not None and "shards" in checkpoint:  # every process reads its part, on any world size
            from sharded_checkpoint import load_training_state
            load_training_state(checkpoint["shards"], state.model, state.optimizer)
        elif checkpoint is not None:
            restore_training_state(checkpoint, state.model, state.optimizer, state.scaler)
        model = checkpoint = None  # state holds the model; the checkpoint's tensors can go

        wandb_settings = dict(project=settings.wandb_project, name=settings.wandb_run_name, config=vars(settings))
        log = RunLog(settings.out_dir, processes.master, wandb_settings if settings.wandb_log else None)
        log_start(state, log, init_from, position.step, ptdtype, changes)
        StopRequest.install(under_torchrun=processes.distributed)
        finished = train_loop(state, batches, log, position, hellaswag)
        if state.checkpointer is not None:
            state.checkpointer.close()  # the last save written before the run ends
        if processes.distributed:
            dist.barrier()
    finally:
        state = model = None
        release(log)
    return 0 if finished else STOPPED_EXIT


if __name__ == "__main__":
    run_main(main)
