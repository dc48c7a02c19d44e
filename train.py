"""
Trains a GPT on one device, or on many through torchrun, with DDP (the default) or FSDP2.

    python train.py config/train_shakespeare_char_cpu.py          # one device: cuda, mps or cpu
    python train.py config/train_shakespeare_char.py --max_iters=2000 --rope=True
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py                 # DDP
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --fsdp=True     # FSDP2

Every setting below can be changed by a config file or --key=value (configurator.py).
The global batch of step k is a pure function of (seed, k), and the dropout of its micro-batch j a pure
function of (seed, k, j), so runs are reproducible, resume exactly and train alike on any number of processes.
"""

import gc
import io
import os
import sys
import json
import math
import time
import signal
import traceback
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from model import GPT, GPTConfig, ConfigError, ATTENTION_IMPLS, GPT2_NAMES, PADDED_GPT2_VOCAB_SIZE
from configurator import apply_overrides
from optimizers import OptimizerGroup, muon_available
from eval_hellaswag import load_hellaswag, evaluate_hellaswag, example_rows
from common import (UserError, run_main, range_check, pick_device, pick_dtype, autocast_context, checkpoint_path,
                    save_checkpoint, load_checkpoint, new_model, load_trained, load_pretrained, read_char_vocab,
                    is_character_vocabulary, estimate_mfu, get_tokenizer)

# -----------------------------------------------------------------------------
# default config: GPT-2 small (124M) on OpenWebText
# I/O
out_dir = "out"
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # save at every eval, not only when val loss improves
# 'scratch' | 'resume' (out_dir/ckpt.pt must exist) | 'auto' (resume when out_dir/ckpt.pt exists, else scratch:
# the setting for long runs, torchrun restarts and SLURM requeues) | 'gpt2' ... 'gpt2-xl' | a local HF folder
init_from = "scratch"
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
            n = os.path.getsize(path) // 2
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
    """
    Join the group through torchrun's store, under a prefix of this restart attempt. The store is served
    by the torchrun agent and outlives a restart of the worker group (--max-restarts), keys included: without
    the prefix a restarted process can read the address a process of the previous attempt published, and the
    group's connection mesh is refused.
    """
    if not processes.distributed:
        return
    store, rank, world_size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", store=store, rank=rank, world_size=world_size)


class StopRequest:
    """
    SIGTERM/SIGINT ask for a checkpoint at the next step boundary. Run alone, a second signal exits at once.
    Under torchrun a second one is the same request arriving again (scancel or Ctrl-C reach every worker
    directly and again through the agent), so it is not taken for "exit now": torchrun kills what is still
    running after its grace period anyway.
    """
    requested = False
    under_torchrun = False

    @classmethod
    def install(cls, under_torchrun):
        cls.requested, cls.under_torchrun = False, under_torchrun
        signal.signal(signal.SIGTERM, cls.handle)
        signal.signal(signal.SIGINT, cls.handle)

    @classmethod
    def handle(cls, signum, frame):
        # os.write, not print: a handler that prints while the main thread prints can raise "reentrant call"
        name = signal.Signals(signum).name
        if cls.requested:
            if cls.under_torchrun:
                return
            os.write(2, f"\nsecond {name}: exiting now without a checkpoint\n".encode())
            os._exit(128 + signum)
        cls.requested = True
        os.write(2, f"\n{name} received: will save a checkpoint and stop after this step\n".encode())


class RunLog:
    """Console lines and out_dir/metrics.jsonl (appended, never truncated), plus wandb when asked, from rank 0 only."""

    def __init__(self, out_dir, active, wandb_settings=None):
        self.active, self.file, self.wandb = active, None, None
        if not active:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.file = open(os.path.join(out_dir, "metrics.jsonl"), "a")
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
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["iter"])

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
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


def resolve_init_from(init_from, ckpt_path, processes):
    """
    'auto' becomes 'resume' when rank 0 has a checkpoint, 'scratch' otherwise. So does 'scratch' in a torchrun
    restart (--max-restarts) that finds a checkpoint: starting over there would overwrite the run's progress.
    A checkpoint that other ranks have and rank 0 has not (a requeue that moved rank 0 to another node) is an error.
    """
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if init_from not in ("auto", "scratch") or (init_from == "scratch" and not restarted):
        return init_from
    has_checkpoint = gather_from_every_rank(os.path.exists(ckpt_path), processes)
    if not has_checkpoint[0] and any(has_checkpoint):
        raise UserError(f"rank 0 has no {ckpt_path} but ranks {[r for r, has in enumerate(has_checkpoint) if has]} do: rank 0's "
                        f"node holds the run's checkpoint; launch rank 0 where it is, or copy it there")
    if has_checkpoint[0] and init_from == "scratch":
        print(f"torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: resuming from {ckpt_path} instead of starting over",
              file=sys.stderr, flush=True)
    return "resume" if has_checkpoint[0] else "scratch"


def read_checkpoint_everywhere(ckpt_path, processes):
    """
    The checkpoint on every process. Rank 0's file is the truth; a process whose node has the same file
    (one machine, or a shared filesystem) reads its own copy, the others receive rank 0's bytes, so a
    multi-node run resumes without a shared filesystem. Received bytes load with weights_only=True too.
    """
    if not processes.distributed:
        return load_checkpoint(ckpt_path)
    def fingerprint():
        try:
            st = os.stat(ckpt_path)
            return (st.st_size, st.st_mtime_ns)
        except OSError:
            return None
    fingerprints = gather_from_every_rank(fingerprint(), processes)
    if fingerprints[0] is None:
        raise UserError(f"no checkpoint at {ckpt_path} on rank 0; train one first, or point --out_dir at the folder that has "
                        f"{os.path.basename(ckpt_path)}")
    if all(f == fingerprints[0] for f in fingerprints):
        return load_checkpoint(ckpt_path)
    payload = [None]
    if processes.master:
        with open(ckpt_path, "rb") as f:
            payload = [f.read()]
    dist.broadcast_object_list(payload, src=0)
    if processes.master:
        return load_checkpoint(ckpt_path)
    return load_checkpoint(io.BytesIO(payload[0]), name=ckpt_path)  # the same name: one message for one damaged file


TRAINING_KEYS = ("optimizer", "iter_num", "best_val_loss", "config")


def build_model(settings, init_from, vocab_size, chars, processes):
    """(model on the CPU, checkpoint or None) for a run starting from init_from, checked against the data."""
    ckpt_path = checkpoint_path(settings.out_dir)
    torch.manual_seed(settings.seed)  # the same initial weights on every process (FSDP shards them where they are)
    if init_from == "resume":
        checkpoint = read_checkpoint_everywhere(ckpt_path, processes)
        missing = [k for k in TRAINING_KEYS if k not in checkpoint]
        if missing:
            raise UserError(f"{ckpt_path} holds a model but not a training run (no {', '.join(missing)}); start from it "
                            f"with --init_from=scratch and load it elsewhere, or export it and use --init_from=<folder>")
        loaded = load_trained(settings.out_dir, checkpoint=checkpoint, need_decoding=False)
        if loaded.model.config.block_size != settings.block_size:
            raise UserError(f"the checkpoint was trained with block_size={loaded.model.config.block_size}; resume with that")
        if checkpoint["config"].get("seed", settings.seed) != settings.seed:
            raise UserError(f"the checkpoint was trained with seed={checkpoint['config']['seed']}, which fixes its batches "
                            f"and dropout; resume with --seed={checkpoint['config']['seed']}")
        other_char_count = is_character_vocabulary(vocab_size) and loaded.model.config.vocab_size != vocab_size
        if checkpoint.get("chars") != chars or other_char_count:
            raise UserError(f"{ckpt_path} was trained on another vocabulary than {settings.dataset}'s; resume it on its own "
                            f"data set ({checkpoint['config'].get('dataset', '?')})")
        return loaded.model, checkpoint
    if init_from == "scratch":
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
            shard_args["offload_policy"] = CPUOffloadPolicy()
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

    @property
    def micro_steps(self):
        """Forward/backward passes per optimizer step on this process."""
        return self.settings.gradient_accumulation_steps // self.processes.world_size

    def set_gradient_sync(self, enabled):
        """Gradients are reduced on the last micro-step only (the switch is on the DDP/FSDP module, not a compiled wrapper)."""
        if not self.processes.distributed:
            return
        if self.settings.fsdp:
            self.wrapped.set_requires_gradient_sync(enabled)
        else:
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
    # one all-reduce carries the loss sum and the stop flag of every process
    summary = torch.stack([loss_sum, torch.tensor(float(StopRequest.requested), device=dev)])
    if processes.distributed:
        dist.all_reduce(summary)
    step_loss = summary[0].item() / settings.gradient_accumulation_steps
    stop_requested = summary[1].item() > 0
    if not math.isfinite(step_loss) and not state.scaler.is_enabled():  # float16 overflows are the scaler's to skip
        kept = ("so the last good checkpoint in " + settings.out_dir + " is kept"
                if os.path.exists(checkpoint_path(settings.out_dir)) else "and no checkpoint had been written yet")
        raise UserError(f"loss became {step_loss} at step {step}; stopped without saving, {kept}. "
                        f"Try a lower --learning_rate or check the data")
    grad_norm, skipped = optimizer_step(state)
    return StepResult(step_loss, grad_norm, stop_requested, skipped)


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
    runs the same number of forwards (FSDP needs all of them in each one)."""
    eval_iters, batch_size, processes, dev = state.settings.eval_iters, state.settings.batch_size, state.processes, state.device
    losses = {}
    state.runner.eval()
    for split, stream in EVAL_STREAMS.items():
        total = torch.zeros(2, device=dev)  # loss sum, batch count
        for j in range(math.ceil(eval_iters / processes.world_size)):
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


def write_checkpoint(path, model, optimizer, scaler, processes, **values):
    """The model, optimizer and scaler state with `values`. Every process takes part (FSDP gathers the
    full state); only rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, StateDictOptions
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if processes.master:
        save_checkpoint(dict(model=model_sd, optimizer=optim_sd, scaler=scaler.state_dict(), **values), path)


def save_run(state, step, best_val_loss, evaluated):
    """The run's checkpoint at `step`. evaluated=False marks one written on a signal: a resume evaluates that step first."""
    write_checkpoint(checkpoint_path(state.settings.out_dir), state.model, state.optimizer, state.scaler, state.processes,
                     model_args=state.model.config.to_dict(), iter_num=step, best_val_loss=best_val_loss,
                     evaluated=evaluated, config=vars(state.settings), world_size=state.processes.world_size,
                     chars=state.chars)


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


def training_state_bytes(model, optimizer):
    """Bytes of parameters, gradients and optimizer state held by this process (its shards under FSDP)."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this process
    params = [local(p) for p in model.parameters()]
    moments = [local(v) for per_param in optimizer.state.values() for v in per_param.values() if torch.is_tensor(v)]
    return dict(params=sum(t.numel() * t.element_size() for t in params),
                grads=sum(t.numel() * t.element_size() for t in params),  # one gradient per parameter element
                optimizer=sum(t.numel() * t.element_size() for t in moments))


def report_training_state(state, log, step):
    held = gather_from_every_rank(training_state_bytes(state.model, state.optimizer), state.processes)
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


def run_hellaswag(state, examples, encode, log, step):
    # the uncompiled module: every example has its own length, which would recompile a compiled one
    result = evaluate_hellaswag(state.model, examples, state.device, state.autocast, encode, state.processes.rank,
                                state.processes.world_size)
    log.print(f"step {step}: hellaswag {result['n']} examples, acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f}")
    log.metrics(dict(iter=step, hellaswag_acc=result["acc"], hellaswag_acc_norm=result["acc_norm"], hellaswag_n=result["n"]))


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


def start_training(settings, model, processes, dev, ptdtype, chars):
    """The model placed, wrapped and compiled as the settings ask, with a fresh optimizer and scaler."""
    device_type = dev.split(":")[0]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model.set_attention_impl(settings.attn_impl)
    model.gradient_checkpointing = settings.grad_checkpoint
    if not (processes.distributed and settings.fsdp):
        model.to(dev)  # fully_shard moves each shard to the device itself: no whole model on every GPU first
    wrapped, autocast_dtype = wrap_model(model, processes, settings, device_type, ptdtype)
    use_compile = settings.compile if settings.compile is not None else device_type == "cuda"
    return TrainState(settings, model, wrapped, torch.compile(wrapped) if use_compile else wrapped,
                      build_optimizer(model, settings, device_type),
                      torch.amp.GradScaler(device_type, enabled=ptdtype == "float16"),
                      processes, autocast_context(dev, autocast_dtype), dev, chars)


def log_start(state, log, init_from, step, ptdtype):
    settings, processes, model = state.settings, state.processes, state.model
    mode = ("FSDP" if settings.fsdp else "DDP") if processes.distributed else "single process"
    log.print(f"{mode} on {processes.world_size} x {state.device}, {ptdtype}, compile={state.runner is not state.wrapped}; "
              f"model {model.get_num_params() / 1e6:.2f}M parameters; "
              f"{settings.gradient_accumulation_steps * settings.batch_size * model.config.block_size:,} tokens per step; "
              f"init_from={init_from}" + (f" at step {step}" if init_from == "resume" else ""))
    log.metrics(dict(event="start", iter=step, init_from=init_from, world_size=processes.world_size, device=state.device,
                     dtype=ptdtype, params=model.get_num_params()))
    if step >= settings.max_iters and not settings.eval_only and init_from == "resume":
        log.print(f"the checkpoint is at step {step}, not below --max_iters={settings.max_iters}: nothing to train")


def evaluate(state, batches, log, step, lr, best_val_loss):
    """Losses on the evaluation batches, logged; a checkpoint when they improve (or always_save_checkpoint).
    Returns the best validation loss so far."""
    settings = state.settings
    losses = estimate_loss(state, batches)
    log.print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    log.metrics(dict(iter=step, train_loss=losses["train"], val_loss=losses["val"], lr=lr))
    if losses["val"] < best_val_loss or settings.always_save_checkpoint:
        best_val_loss = min(best_val_loss, losses["val"])
        if step > 0 and not settings.eval_only:
            save_run(state, step, best_val_loss, evaluated=True)
            log.print(f"saved checkpoint to {checkpoint_path(settings.out_dir)}")
    return best_val_loss


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
    settings = SimpleNamespace(**apply_overrides(globals(), sys.argv[1:]))
    processes = processes_from_env()
    validate_settings(settings)
    dev, ptdtype = check_launch(settings, processes)
    data_dir = os.path.join(settings.data_root, settings.dataset)
    vocab_size, chars = data_vocabulary(data_dir)
    ckpt_path = checkpoint_path(settings.out_dir)
    if settings.init_from in ("scratch", "auto"):  # the settings must make a model, whatever auto decides
        check_model_settings(settings, vocab_size)
    hellaswag_examples = read_hellaswag_examples(settings, vocab_size, chars)

    log, state = None, None
    try:
        init_process_group(processes, dev.split(":")[0])
        if dev.startswith("cuda"):
            torch.cuda.set_device(dev)
        init_from = resolve_init_from(settings.init_from, ckpt_path, processes)
        model, checkpoint = build_model(settings, init_from, vocab_size, chars, processes)
        batches = BatchStream(data_dir, model.config.block_size, settings.seed, model.config.vocab_size)
        batches.check()
        if hellaswag_examples is not None:
            encode = get_tokenizer().encode
            for i, example in enumerate(hellaswag_examples):  # an ending the model cannot hold: say so before training
                example_rows(example, encode, model.config.block_size, i)
        state = start_training(settings, model, processes, dev, ptdtype, chars)
        iter_num, best_val_loss, evaluated_step = 0, math.inf, None  # evaluated_step: the resumed step, evaluated before
        if checkpoint is not None:
            restore_training_state(checkpoint, state.model, state.optimizer, state.scaler)
            iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
            evaluated_step = iter_num if checkpoint.get("evaluated", True) and not settings.eval_only else None
        model = checkpoint = None  # state holds the model; the checkpoint's tensors can go

        wandb_settings = dict(project=settings.wandb_project, name=settings.wandb_run_name, config=vars(settings))
        log = RunLog(settings.out_dir, processes.master, wandb_settings if settings.wandb_log else None)
        log_start(state, log, init_from, iter_num, ptdtype)
        StopRequest.install(under_torchrun=processes.distributed)
        first_iter, stop_requested, skipped_in_a_row = iter_num, False, 0
        t0 = time.time()
        while True:
            lr = set_learning_rates(state.optimizer, iter_num, settings)
            if stop_requested:  # nothing but the checkpoint: torchrun and SLURM kill 30 s after their signal
                save_run(state, iter_num, best_val_loss, evaluated=False)
                log.print(f"stopped at step {iter_num} on a signal; checkpoint saved to {ckpt_path}. "
                          f"Continue with --init_from=resume (or --init_from=auto)")
                break

            # evaluate and checkpoint (a resumed run already did this at the step it resumed from)
            last_step = iter_num >= settings.max_iters
            due = lambda interval: (iter_num % interval == 0 or last_step or settings.eval_only) and iter_num != evaluated_step
            if due(settings.eval_interval):
                best_val_loss = evaluate(state, batches, log, iter_num, lr, best_val_loss)
                t0 = time.time()  # step timings leave evaluation out
            if hellaswag_examples is not None and due(settings.hellaswag_interval):
                run_hellaswag(state, hellaswag_examples, encode, log, iter_num)
                t0 = time.time()
            if settings.eval_only or last_step:
                break

            result = train_step(state, batches, iter_num)
            stop_requested = result.stop_requested
            skipped_in_a_row = skipped_in_a_row + 1 if result.skipped else 0
            if skipped_in_a_row >= MAX_SKIPPED_STEPS:
                raise UserError(f"float16 gradients overflowed {skipped_in_a_row} steps in a row up to step {iter_num} "
                                f"(loss {result.loss}): the run diverged; try a lower --learning_rate "
                                f"or --dtype=bfloat16 on a GPU that has it")
            t1 = time.time()
            dt, t0 = t1 - t0, t1
            if iter_num % settings.log_interval == 0:
                log_step(state, log, iter_num, result, lr, dt)
            if iter_num == first_iter:  # optimizer state exists now: report what each process holds
                report_training_state(state, log, iter_num)
            iter_num += 1
        if processes.distributed:
            dist.barrier()
    finally:
        state = model = None
        release(log)


if __name__ == "__main__":
    run_main(main)
