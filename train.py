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
signal (SIGTERM, SIGINT, SIGUSR1) with a checkpoint to resume from. Beside it: dataloader.py (the batches),
checkpoint.py (writing, reading and resuming checkpoints), distributed.py (the processes, DDP and FSDP),
stopping.py (stop signals) and runlog.py (console lines and metrics.jsonl).
"""

import os
import sys
import math
import time
import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.distributed as dist

from model import GPT, GPTConfig
from errors import ConfigError
from attention import ATTENTION_IMPLS
from configurator import read_settings
from optimizers import OptimizerGroup, muon_available
from eval_hellaswag import load_hellaswag, evaluate_hellaswag, example_rows
from common import (UserError, run_main, range_check, pick_device, pick_dtype, autocast_context, new_model,
                    load_pretrained, is_character_vocabulary, estimate_mfu, get_tokenizer)
from checkpoint import (MODEL_SETTINGS, Checkpoints, RunPosition, check_out_dir_and_sources,
                        resolve_init_from, read_resume, changed_settings, restore, open_checkpoints, has_checkpoint)
from distributed import (Processes, processes_from_env, init_process_group, gather_from_every_rank, wrap_model,
                         is_on_meta, materialise_sharded, gradient_bytes, training_state_bytes, release)
from stopping import StopRequest, check_stop, STOPPED_EXIT
from dataloader import BatchStream, TRAIN_STREAM, EVAL_STREAMS, dropout_seed, data_vocabulary
from runlog import RunLog

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

OPTIMIZERS = ("adamw", "muon")
MAX_SKIPPED_STEPS = 20  # float16: this many overflowing steps in a row is divergence, not a scale still settling
HELLASWAG_CHUNK = 16  # examples per process between two looks at a stop request


# -----------------------------------------------------------------------------
# validation

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
    validate_optimizer(settings, need)
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
    check_out_dir_and_sources(settings)
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


def validate_optimizer(settings, need):
    """The optimizer's settings: AdamW's and clipping always, Muon's under --optimizer=muon."""
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


# -----------------------------------------------------------------------------
# data

def read_hellaswag_examples(settings, vocab_size, chars):
    """The HellaSwag examples to score during training, or None when hellaswag_interval is 0."""
    if not settings.hellaswag_interval:
        return None
    if chars is not None or is_character_vocabulary(vocab_size):
        raise UserError("HellaSwag scores English text with the GPT-2 BPE tokenizer; a character-level model "
                        "cannot take it: set --hellaswag_interval=0")
    examples = load_hellaswag(settings.hellaswag_path)
    return examples[:settings.hellaswag_max_examples] if settings.hellaswag_max_examples else examples


# -----------------------------------------------------------------------------
# model and optimizer

def model_args(settings, vocab_size):
    return dict({key: getattr(settings, key) for key in MODEL_SETTINGS}, vocab_size=vocab_size)


def check_model_settings(settings, vocab_size):
    try:
        GPTConfig(**model_args(settings, vocab_size))
    except ConfigError as e:
        raise UserError(str(e)) from None


def build_model(settings, assigned, init_from, vocab_size, chars, processes):
    """(model on the CPU, checkpoint or None) for a run starting from init_from, checked against the data.
    `assigned`: the settings the user set (configurator), which a resume must not contradict."""
    torch.manual_seed(settings.seed)  # the same initial weights on every process (FSDP shards them where they are)
    on_meta = processes.distributed and settings.fsdp  # FSDP: built without storage, sharded, then materialised
    if init_from == "resume":
        return read_resume(settings, assigned, processes, chars, vocab_size, on_meta)
    if init_from == "scratch":
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            return new_model(model_args(settings, vocab_size)), None
    overrides = {k: getattr(settings, k) for k in GPTConfig.PRETRAINED_OVERRIDES if getattr(settings, k) is not None}
    loaded = load_pretrained(init_from, overrides, need_decoding=False)
    if settings.rope and not loaded.model.config.rope:  # the source decides the position encoding; it cannot be switched
        raise UserError(f"{init_from} uses learned positions; --rope=True needs init_from=scratch or a rotary model")
    if loaded.chars != chars:
        theirs, ours = ("GPT-2 BPE" if c is None else f"a {len(c)}-character vocabulary" for c in (loaded.chars, chars))
        raise UserError(f"{init_from} reads {theirs} but {settings.dataset} is in {ours}; fine-tune it on data in its own tokens")
    return loaded.model, None


def build_optimizer(model, settings, device_type):
    """AdamW, or AdamW and Muon (model.configure_optimizers), with this run's settings; FSDP's sharded parameters
    take AdamW's per-tensor implementation."""
    muon = None
    if settings.optimizer == "muon":
        muon = dict(lr=settings.muon_lr, momentum=settings.muon_momentum, ns_steps=settings.muon_ns_steps,
                    weight_decay=settings.muon_weight_decay)
    return model.configure_optimizers(settings.weight_decay, settings.learning_rate, (settings.beta1, settings.beta2),
                                      device_type, fused=False if settings.fsdp else None, muon=muon)


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
    checkpoints: Checkpoints | None = None  # where and how this run's checkpoints are written (checkpoint.py)
    chars: list | None = None  # the character vocabulary the checkpoints carry
    gradient_bytes: int | None = None  # the most gradient storage this process held in its first step (measured)

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


def start_training(settings, model, processes, placement, chars, initialise=True):
    """The model placed (placement: device and dtype, from check_launch), wrapped and compiled as the settings ask,
    with a fresh optimizer and scaler. A model FSDP built on the meta device gets its shards' storage here, and
    GPT()'s weights unless a checkpoint will fill them (initialise=False)."""
    dev, ptdtype = placement
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
    return TrainState(settings, model, wrapped, torch.compile(wrapped) if use_compile else wrapped,
                      build_optimizer(model, settings, device_type),
                      torch.amp.GradScaler(device_type, enabled=ptdtype == "float16"),
                      processes, autocast_context(dev, autocast_dtype), dev, open_checkpoints(settings, processes), chars)


# -----------------------------------------------------------------------------
# schedule

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


def set_learning_rates(optimizer, step, settings):
    """Every param group at `step` of the schedule, from its own peak_lr: AdamW's groups follow lr_at exactly,
    Muon's the same curve scaled by muon_lr / learning_rate. Returns AdamW's (the logged lr)."""
    for group in optimizer.param_groups:
        ratio = group["peak_lr"] / settings.learning_rate  # 1.0 exactly for AdamW's groups
        group["lr"] = lr_at(step, group["peak_lr"], settings.warmup_iters, settings.lr_decay_iters,
                            settings.min_lr * ratio, settings.decay_lr)
    return lr_at(step, settings.learning_rate, settings.warmup_iters, settings.lr_decay_iters, settings.min_lr,
                 settings.decay_lr)


# -----------------------------------------------------------------------------
# one optimizer step

class StepResult(NamedTuple):
    loss: float  # the mean over all micro-steps and processes
    grad_norm: float | None  # before clipping; None without clipping
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
    if processes.distributed:
        dist.all_reduce(loss_sum)
    step_loss = loss_sum.item() / settings.gradient_accumulation_steps
    if not math.isfinite(step_loss) and not state.scaler.is_enabled():  # float16 overflows are the scaler's to skip
        raise diverged("loss", step_loss, step, settings.out_dir)
    grad_norm, skipped = optimizer_step(state)
    return StepResult(step_loss, grad_norm, skipped)


def diverged(what, value, step, out_dir):
    """The error of a run whose loss is no longer a number: nothing is saved, the last good checkpoint stays."""
    kept = ("so the last good checkpoint in " + out_dir + " is kept" if has_checkpoint(out_dir)
            else "and no checkpoint had been written yet")
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


# -----------------------------------------------------------------------------
# evaluation and checkpoints

@torch.no_grad()
def estimate_loss(state, batches):
    """Mean loss over eval_iters fixed batches per split, shared out over the processes. Every process
    runs the same number of forwards (FSDP needs all of them in each one). A stop request is honoured
    between batches: None then."""
    eval_iters, batch_size, processes, dev = state.settings.eval_iters, state.settings.batch_size, state.processes, state.device
    losses = {}
    state.runner.eval()
    for split, stream in EVAL_STREAMS.items():
        total = torch.zeros(2, device=dev)  # loss sum, batch count
        for j in range(math.ceil(eval_iters / processes.world_size)):
            if check_stop(processes, dev):
                state.runner.train()
                return None
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
    out_dir/ckpt.pt (or ckpt.dcp/: checkpoint.py), the state to continue from at position.step (evaluated=False
    marks one written on a stop request: a resume evaluates that step first), and with val_loss (an improved
    validation loss) out_dir/best.pt, the weights alone. ckpt.pt goes first, so its best_val_loss is never above
    best.pt's: a crash between the two writes may lose the newest best weights, but no later write can replace
    better ones. Returns the paths written.
    """
    values = dict(model_args=state.model.config.to_dict(), chars=state.chars, iter_num=position.step,
                  config=vars(state.settings), evaluated=evaluated, best_val_loss=position.best_val_loss,
                  world_size=state.processes.world_size)
    position.saved_step = position.step
    return state.checkpoints.save(values, state.model, state.optimizer, state.scaler, val_loss)


def run_hellaswag(state, examples, encode, log, step):
    """evaluate_hellaswag over the examples in chunks, with a stop request honoured between them (False then);
    every example is scored alone, so the chunks add up to one pass over all of them."""
    # the uncompiled module: every example has its own length, which would recompile a compiled one
    processes, chunk = state.processes, HELLASWAG_CHUNK * state.processes.world_size
    correct, correct_norm = 0, 0
    for start in range(0, len(examples), chunk):
        if check_stop(processes, state.device):
            return False
        part = examples[start:start + chunk]
        result = evaluate_hellaswag(state.model, part, state.device, state.autocast, encode, processes.rank,
                                    processes.world_size)
        correct += sum(p == e["label"] for p, e in zip(result["pred"], part))
        correct_norm += sum(p == e["label"] for p, e in zip(result["pred_norm"], part))
    n = len(examples)
    log.print(f"step {step}: hellaswag {n} examples, acc {correct / n:.4f}, acc_norm {correct_norm / n:.4f}")
    log.metrics(dict(iter=step, hellaswag_acc=correct / n, hellaswag_acc_norm=correct_norm / n, hellaswag_n=n))
    return True


# -----------------------------------------------------------------------------
# logging

def log_start(state, log, init_from, step, ptdtype, changes):
    """The start line (and record): how the run is laid out, where it starts, and what a resume changed."""
    settings, processes, model = state.settings, state.processes, state.model
    mode = ("FSDP" if settings.fsdp else "DDP") if processes.distributed else "single process"
    log.print(f"{mode} on {processes.world_size} x {state.device}, {ptdtype}, compile={state.runner is not state.wrapped}; "
              f"model {model.get_num_params() / 1e6:.2f}M parameters; "
              f"{settings.gradient_accumulation_steps * settings.batch_size * model.config.block_size:,} tokens per step; "
              f"init_from={init_from}" + (f" at step {step}" if init_from == "resume" else ""))
    if state.checkpoints.note is not None:
        log.print("checkpoints: " + state.checkpoints.note)
    if changes:
        log.print("changed since the checkpoint's run: " + ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items()))
    log.metrics(dict(event="start", iter=step, init_from=init_from, world_size=processes.world_size, device=state.device,
                     dtype=ptdtype, params=model.get_num_params(), changed={key: new for key, (_, new) in changes.items()}))
    if step >= settings.max_iters and not settings.eval_only and init_from == "resume":
        log.print(f"the checkpoint is at step {step}, not below --max_iters={settings.max_iters}: nothing to train")


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


def report_training_state(state, log, step):
    held = gather_from_every_rank(training_state_bytes(state.model, state.optimizer, state.gradient_bytes), state.processes)
    for rank, parts in enumerate(held):
        log.print(f"rank {rank} holds {sum(parts.values()) / 2**20:,.1f} MiB of training state: " +
                  ", ".join(f"{k} {v / 2**20:,.1f}" for k, v in parts.items()))
    log.metrics(dict(iter=step, state_mib_per_rank=[{k: v / 2**20 for k, v in parts.items()} for parts in held]))


# -----------------------------------------------------------------------------
# the loop

def evaluate(state, batches, log, position, lr):
    """Losses on the evaluation batches, logged; then (unless eval_only) ckpt.pt, and best.pt too when the
    validation loss improves. False when every process agreed to stop during it: before any file is written,
    or while the checkpoint was being written."""
    settings = state.settings
    losses = estimate_loss(state, batches)
    if losses is None:
        return False
    log.print(f"step {position.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    log.metrics(dict(iter=position.step, train_loss=losses["train"], val_loss=losses["val"], lr=lr))
    if not settings.eval_only:
        if not math.isfinite(losses["val"]):  # weights gone bad in the last step: never a checkpoint of them
            raise diverged("validation loss", losses["val"], position.step, settings.out_dir)
        improved = losses["val"] < position.best_val_loss
        position.best_val_loss = min(position.best_val_loss, losses["val"])
        written = save_run(state, position, evaluated=True, val_loss=losses["val"] if improved else None)
        log.print("saved " + " and ".join(written) + (" (val loss improved)" if improved else "")
                  + (" (writing in the background)" if state.checkpoints.in_background else ""))
    return not check_stop(state.processes, state.device)


def stop(state, log, position):
    """A stop request agreed by every process: the checkpoint of this step (unless it was just written), then a
    note. Returns False, the loop's answer for a run that did not finish."""
    if position.saved_step != position.step:
        save_run(state, position, evaluated=False)
    state.checkpoints.wait()  # written before the process says it stopped
    log.print(f"stopped at step {position.step} on request; checkpoint saved to {state.checkpoints.where}. "
              f"Continue with the same command and --init_from=auto (or --init_from=resume); exit status {STOPPED_EXIT}")
    return False


def due(interval, position, last_step, eval_only):
    """Whether an evaluation every `interval` steps runs at this step: at the last one too, but never again at
    the step a resumed checkpoint evaluated already."""
    return (position.step % interval == 0 or last_step or eval_only) and position.step != position.evaluated_step


def train_loop(state, batches, log, position, hellaswag):
    """Evaluate when due, then one optimizer step, until max_iters (True) or a stop request (False, a checkpoint
    written). hellaswag: (examples, encode) or None."""
    settings = state.settings
    first_step, skipped_in_a_row = position.step, 0
    while True:
        step = position.step
        lr = set_learning_rates(state.optimizer, step, settings)
        if check_stop(state.processes, state.device):  # then nothing but the checkpoint: torchrun and SLURM kill 30 s after their signal
            return stop(state, log, position)
        last_step = step >= settings.max_iters
        if due(settings.eval_interval, position, last_step, settings.eval_only):
            if not evaluate(state, batches, log, position, lr):
                return stop(state, log, position)
        if hellaswag is not None and due(settings.hellaswag_interval, position, last_step, settings.eval_only):
            if not run_hellaswag(state, *hellaswag, log, step):
                return stop(state, log, position)
        if settings.eval_only or last_step:
            return True

        t0 = time.time()  # step timings leave evaluation out
        result = train_step(state, batches, step)
        dt = time.time() - t0
        skipped_in_a_row = skipped_in_a_row + 1 if result.skipped else 0
        if skipped_in_a_row >= MAX_SKIPPED_STEPS:
            raise UserError(f"float16 gradients overflowed {skipped_in_a_row} steps in a row up to step {step} "
                            f"(loss {result.loss}): the run diverged; try a lower --learning_rate "
                            f"or --dtype=bfloat16 on a GPU that has it")
        if step % settings.log_interval == 0:
            log_step(state, log, step, result, lr, dt)
        if step == first_step:  # optimizer state exists now: report what each process holds
            report_training_state(state, log, step)
        position.step += 1


# -----------------------------------------------------------------------------
# main

def main():
    assigned = set()  # the settings the user set: a resume must not contradict them
    settings = read_settings(globals(), sys.argv[1:], assigned=assigned)
    processes = processes_from_env()
    validate_settings(settings)
    placement = check_launch(settings, processes)
    dev, ptdtype = placement
    data_dir = os.path.join(settings.data_root, settings.dataset)
    vocab_size, chars = data_vocabulary(data_dir)
    if "scratch" in (settings.init_from, settings.auto_from):  # the settings must make a model, whatever auto decides
        check_model_settings(settings, vocab_size)
    hellaswag_examples = read_hellaswag_examples(settings, vocab_size, chars)

    log, state = None, None
    try:
        init_process_group(processes, dev.split(":")[0])
        if dev.startswith("cuda"):
            torch.cuda.set_device(dev)
        init_from = resolve_init_from(settings, processes)
        model, checkpoint = build_model(settings, assigned, init_from, vocab_size, chars, processes)
        batches = BatchStream(data_dir, model.config.block_size, settings.seed, model.config.vocab_size)
        batches.check()
        hellaswag = None
        if hellaswag_examples is not None:
            hellaswag = (hellaswag_examples, get_tokenizer().encode)
            for i, example in enumerate(hellaswag_examples):  # an ending the model cannot hold: say so before training
                example_rows(example, hellaswag[1], model.config.block_size, i)
        state = start_training(settings, model, processes, placement, chars, initialise=checkpoint is None)
        position = RunPosition.of(checkpoint, settings.eval_only)
        changes = changed_settings(settings, checkpoint, processes.world_size)
        if checkpoint is not None:  # every process reads its part, on any world size
            restore(checkpoint, state.model, state.optimizer, state.scaler)
        model = checkpoint = None  # state holds the model; the checkpoint's tensors can go

        wandb_settings = dict(project=settings.wandb_project, name=settings.wandb_run_name, config=vars(settings))
        log = RunLog(settings.out_dir, processes.master, wandb_settings if settings.wandb_log else None)
        log_start(state, log, init_from, position.step, ptdtype, changes)
        StopRequest.install(under_torchrun=processes.distributed)
        finished = train_loop(state, batches, log, position, hellaswag)
        state.checkpoints.close()  # the last save written before the run ends
        if processes.distributed:
            dist.barrier()
    finally:
        state = model = None
        release(log)
    return 0 if finished else STOPPED_EXIT


if __name__ == "__main__":
    run_main(main)
