"""
Trains a GPT on one device, or on many through torchrun, with DDP (the default) or FSDP2.

    python train.py config/train_shakespeare_char_cpu.py          # one device: cuda, mps or cpu
    python train.py config/train_shakespeare_char.py --max_iters=2000 --rope=True
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py                 # DDP
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --fsdp=True     # FSDP2

Every setting below can be changed by a config file or --key=value (configurator.py).
The global batch of step k is a pure function of (seed, k), so runs are reproducible, resume exactly
and train on the same batches whatever the number of processes.
"""

import os
import sys
import json
import math
import time
import random
import signal

import numpy as np
import torch
import torch.distributed as dist

from model import GPT, GPTConfig, load_model_state
from configurator import apply_overrides
from common import UserError, run_main, pick_device, pick_dtype, autocast_context, save_checkpoint, load_checkpoint, char_vocab_path, estimate_mfu

# -----------------------------------------------------------------------------
# default config: GPT-2 small (124M) on OpenWebText
# I/O
out_dir = "out"
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # save at every eval, not only when val loss improves
init_from = "scratch"  # 'scratch' | 'resume' | 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl' | a local HF GPT-2 directory
# logging
wandb_log = False
wandb_project = "owt"
wandb_run_name = "gpt2"
# data
dataset = "openwebtext"
data_root = "data"  # the bins are in data_root/dataset/{train,val}.bin
gradient_accumulation_steps = 5 * 8  # global: micro-steps per optimizer step, summed over all processes
batch_size = 12  # sequences per micro-step per process
block_size = 1024
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # 0 for pretraining, try 0.1+ for finetuning
bias = True
rope = False
rope_theta = 10000.0
n_kv_head = None  # None: multi-head attention; fewer: grouped-query attention
window = None  # None: full causal attention; an int, or one entry per layer, for sliding windows
attn_impl = "auto"  # 'auto' | 'dense' | 'blocked' | 'flex' for windowed layers
# AdamW
learning_rate = 6e-4
max_iters = 600000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables clipping
# learning-rate schedule: linear warmup, then cosine decay to min_lr
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000
min_lr = 6e-5
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


class Stop:
    """SIGTERM/SIGINT ask for a checkpoint at the next step boundary; a second signal exits at once."""
    requested = False

    @classmethod
    def handle(cls, signum, frame):
        if cls.requested:
            print(f"\nsecond {signal.Signals(signum).name}: exiting now without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        cls.requested = True
        print(f"\n{signal.Signals(signum).name} received: will save a checkpoint and stop after this step", file=sys.stderr, flush=True)


def get_lr(it):
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def open_bin(split):
    # a fresh memmap per batch avoids the memory growth of keeping one open (nanoGPT's note)
    return np.memmap(os.path.join(data_root, dataset, f"{split}.bin"), dtype=np.uint16, mode="r")


def check_data(vocab_size):
    """All data problems a user can cause, found before any work is done."""
    for split in ("train", "val"):
        path = os.path.join(data_root, dataset, f"{split}.bin")
        if not os.path.exists(path):
            raise UserError(f"no {split} data at {path}; prepare it first with: python data/{dataset}/prepare.py")
        n = os.path.getsize(path) // 2
        if n < block_size + 1:
            raise UserError(f"{path} has {n} tokens, fewer than block_size + 1 = {block_size + 1}; use a smaller --block_size or more data")
        if n <= 200_000_000:  # a full scan is quick below this size; larger sets are checked batch by batch
            top = int(open_bin(split).max())
            if top >= vocab_size:
                raise UserError(f"{path} holds token id {top}, not below the model's vocab_size {vocab_size}: the data and "
                                f"the model disagree; prepare the data again with python data/{dataset}/prepare.py")


def load_rows(split, offsets, vocab_size):
    data = open_bin(split)
    x = np.stack([data[o:o + block_size] for o in offsets]).astype(np.int64)
    y = np.stack([data[o + 1:o + 1 + block_size] for o in offsets]).astype(np.int64)
    if x.max() >= vocab_size or y.max() >= vocab_size:
        raise UserError(f"{split}.bin of {dataset} holds a token id >= vocab_size {vocab_size}; prepare the data again")
    return torch.from_numpy(x), torch.from_numpy(y)


def offsets_for(stream, index, rows, split):
    """Start offsets of `rows` sequences, a pure function of (seed, stream, index): the batch stream."""
    n_tokens = len(open_bin(split))
    return np.random.default_rng([seed, stream, index]).integers(0, n_tokens - block_size, size=rows)


def main():
    config = apply_overrides(globals(), sys.argv[1:])

    # ---- distributed set-up: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE --------------------
    distributed = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    if distributed:
        rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    elif fsdp:
        raise UserError("--fsdp=True needs several processes: launch with torchrun --standalone --nproc_per_node=N train.py --fsdp=True")
    master = rank == 0
    dev = pick_device(device)
    if distributed and dev.startswith("cuda"):
        dev = f"cuda:{local_rank}"  # one GPU per process, whatever cuda:N was asked for
    device_type = dev.split(":")[0]
    ptdtype_name = pick_dtype(dtype, dev)
    if fsdp and ptdtype_name == "float16":
        raise UserError("FSDP here uses bfloat16 mixed precision; float16 needs a sharded grad scaler: use --dtype=bfloat16")
    for name in ("gradient_accumulation_steps", "batch_size", "eval_interval", "log_interval", "eval_iters"):
        if globals()[name] < 1:
            raise UserError(f"--{name} must be >= 1, got {globals()[name]}")
    if gradient_accumulation_steps % world_size != 0:
        raise UserError(f"gradient_accumulation_steps={gradient_accumulation_steps} (global) does not divide by the "
                        f"{world_size} processes; use a multiple of {world_size}")
    micro_steps = gradient_accumulation_steps // world_size  # per process
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir {out_dir!r} is a file, not a folder; choose another --out_dir")

    # ---- model ---------------------------------------------------------------------------------
    meta_path = char_vocab_path(dataset, data_root)
    vocab_size, chars = 50304, None  # GPT-2's 50257 padded to a multiple of 64; chars: a character vocabulary
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        vocab_size, itos = meta["vocab_size"], meta.get("itos", {})
        if len(itos) == vocab_size:  # kept in the checkpoint so that sample.py can decode anywhere
            chars = [itos[str(i)] for i in range(vocab_size)]
    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                      vocab_size=vocab_size, dropout=dropout, rope=rope, rope_theta=rope_theta,
                      n_kv_head=n_kv_head, window=window)
    iter_num, best_val_loss, checkpoint = 0, 1e9, None
    torch.manual_seed(seed)  # the same initial weights on every process (FSDP shards them where they are)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    try:
        if init_from == "scratch":
            model = GPT(GPTConfig(**model_args))
        elif init_from == "resume":
            checkpoint = load_checkpoint(ckpt_path)
            model_args = checkpoint["model_args"]
            if model_args["block_size"] != block_size:
                raise UserError(f"the checkpoint was trained with block_size={model_args['block_size']}; resume with that")
            model = GPT(GPTConfig.from_dict(model_args))
            load_model_state(model, checkpoint["model"])
            iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        elif init_from.startswith("gpt2") or os.path.isdir(init_from):
            override = dict(dropout=dropout, block_size=block_size)
            if n_kv_head is not None:
                override["n_kv_head"] = n_kv_head
            if window is not None:
                override["window"] = window
            if rope:
                raise UserError("GPT-2 checkpoints use learned positions; --rope=True needs init_from=scratch")
            model = GPT.from_pretrained(init_from, override)
            model_args = model.config.to_dict()
        else:
            raise UserError(f"unknown init_from {init_from!r}; use scratch, resume, gpt2, gpt2-medium, gpt2-large, gpt2-xl or a local directory")
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    model_args = model.config.to_dict()
    check_data(model.config.vocab_size)

    if distributed:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        if device_type == "cuda":
            torch.cuda.set_device(dev)
    if master:
        os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed + rank)  # dropout differs per process; batches come from the stream instead
    if checkpoint is not None:
        restore_rng(checkpoint.get("rng"), rank, world_size)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model.set_attention_impl(attn_impl)
    model.gradient_checkpointing = grad_checkpoint
    model.to(dev)

    # ---- wrap: DDP or FSDP2 --------------------------------------------------------------------
    raw_model = model
    ctx = autocast_context(dev, ptdtype_name)
    if distributed and fsdp:
        from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy
        mp_policy = MixedPrecisionPolicy()
        if ptdtype_name == "bfloat16":  # bf16 compute, fp32 gradient reduction and master weights
            mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            ctx = autocast_context(dev, "float32")
        shard_args = dict(mp_policy=mp_policy)
        if fsdp_cpu_offload:
            shard_args["offload_policy"] = CPUOffloadPolicy()
        for block in model.transformer.h:
            fully_shard(block, **shard_args)
        fully_shard(model, **shard_args)
    elif distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    wrapped = model  # the DDP/FSDP module: gradient sync is switched on it, not on a compiled wrapper
    use_compile = compile if compile is not None else device_type == "cuda"
    if use_compile:
        model = torch.compile(model)

    optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type,
                                               fused=False if fsdp else None)
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype_name == "float16")
    if checkpoint is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict, StateDictOptions
        set_optimizer_state_dict(raw_model, optimizer, checkpoint["optimizer"], options=StateDictOptions(full_state_dict=True))
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
    checkpoint = None  # free memory

    def write_checkpoint():
        """Every process takes part (FSDP gathers the full state); only rank 0 writes."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, StateDictOptions
        model_sd, optim_sd = get_state_dict(raw_model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rng = gather_rng(world_size)
        if master:
            save_checkpoint(dict(model=model_sd, optimizer=optim_sd, scaler=scaler.state_dict(), model_args=model_args,
                                 iter_num=iter_num, best_val_loss=best_val_loss, config=config, rng=rng,
                                 world_size=world_size, chars=chars), ckpt_path)

    metrics_file = open(os.path.join(out_dir, "metrics.jsonl"), "a") if master else None

    def log_metrics(record):
        if master:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if wandb_log:
                wandb.log(record, step=record["iter"])

    if wandb_log and master:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over eval_iters fixed batches per split, shared out over the processes. Every
        process runs the same number of forwards (FSDP needs all of them in each one)."""
        out = {}
        model.eval()
        for stream, split in ((1, "train"), (2, "val")):
            total = torch.zeros(2, device=dev)  # loss sum, batch count
            for j in range(math.ceil(eval_iters / world_size)):
                i = j * world_size + rank
                offsets = offsets_for(stream, min(i, eval_iters - 1), batch_size, split)
                X, Y = (t.to(dev) for t in load_rows(split, offsets, raw_model.config.vocab_size))
                with ctx:
                    _, loss = model(X, Y)
                if i < eval_iters:
                    total += torch.stack([loss.float(), torch.ones((), device=dev)])
            if distributed:
                dist.all_reduce(total)
            out[split] = (total[0] / total[1]).item()
        model.train()
        return out

    if master:
        n_params = raw_model.get_num_params()
        mode = "FSDP" if fsdp and distributed else "DDP" if distributed else "single process"
        print(f"{mode} on {world_size} x {dev}, {ptdtype_name}, compile={use_compile}; model {n_params / 1e6:.2f}M parameters; "
              f"{gradient_accumulation_steps * batch_size * block_size:,} tokens per step")
        log_metrics(dict(event="start", iter=iter_num, init_from=init_from, world_size=world_size, device=dev,
                         dtype=ptdtype_name, params=n_params))

    signal.signal(signal.SIGTERM, Stop.handle)
    signal.signal(signal.SIGINT, Stop.handle)
    resumed_at = iter_num if init_from == "resume" and not eval_only else None
    stop_requested = False
    first_iter = iter_num
    t0 = time.time()
    while True:
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # evaluate and checkpoint (a resumed run already did this at the step it resumed from)
        if (iter_num % eval_interval == 0 or iter_num == max_iters or eval_only) and iter_num != resumed_at:
            losses = estimate_loss()
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            log_metrics(dict(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"], lr=lr))
            if losses["val"] < best_val_loss or always_save_checkpoint:
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > 0 and not eval_only:
                    write_checkpoint()
                    if master:
                        print(f"saved checkpoint to {ckpt_path}")
            t0 = time.time()  # step timings leave evaluation out
        if eval_only or iter_num >= max_iters:
            break
        if stop_requested:
            write_checkpoint()
            if master:
                print(f"stopped at step {iter_num} on a signal; checkpoint saved to {ckpt_path}. "
                      f"Continue with --init_from=resume", flush=True)
            break

        # one optimizer step: micro_steps forward/backward passes on this process's slices of the global batch
        offsets = offsets_for(0, iter_num, gradient_accumulation_steps * batch_size, "train")
        loss_sum = torch.zeros((), device=dev)
        for micro in range(micro_steps):
            last = micro == micro_steps - 1
            if distributed and fsdp:
                wrapped.set_requires_gradient_sync(last)
            elif distributed:
                wrapped.require_backward_grad_sync = last
            start = (rank * micro_steps + micro) * batch_size
            X, Y = (t.to(dev, non_blocking=True) for t in load_rows("train", offsets[start:start + batch_size], raw_model.config.vocab_size))
            with ctx:
                _, loss = model(X, Y)
            loss_sum += loss.detach().float()
            scaler.scale(loss / micro_steps).backward()
        # the logged loss is the mean over all micro-steps and processes; one all-reduce carries the stop flag too
        summary = torch.stack([loss_sum, torch.tensor(float(Stop.requested), device=dev)])
        if distributed:
            dist.all_reduce(summary)
        step_loss = summary[0].item() / gradient_accumulation_steps
        stop_requested = summary[1].item() > 0
        if not math.isfinite(step_loss):
            raise UserError(f"loss became {step_loss} at step {iter_num}; stopped without saving, so the last good checkpoint "
                            f"in {out_dir} is kept. Try a lower --learning_rate or check the data")
        grad_norm = None
        if grad_clip != 0.0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            grad_norm = grad_norm.item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if iter_num % log_interval == 0:
            tokens_per_sec = gradient_accumulation_steps * batch_size * block_size / dt
            mfu = estimate_mfu(raw_model, block_size, tokens_per_sec / world_size, dev)
            record = dict(iter=iter_num, loss=step_loss, lr=lr, grad_norm=grad_norm, ms=dt * 1000, tokens_per_sec=tokens_per_sec)
            if mfu is not None:
                record["mfu"] = mfu
            log_metrics(record)
            if master:
                mfu_text = f", mfu {mfu * 100:.1f}%" if mfu is not None else ""
                print(f"iter {iter_num}: loss {step_loss:.4f}, time {dt * 1000:.1f}ms, {tokens_per_sec:,.0f} tok/s{mfu_text}")
        if iter_num == first_iter:  # optimizer state exists now: report what each process holds
            held = training_state_bytes(raw_model, optimizer)
            every = [held]
            if distributed:
                every = [None] * world_size
                dist.all_gather_object(every, held)
            if master:
                for r, b in enumerate(every):
                    print(f"rank {r} holds {sum(b.values()) / 2**20:,.1f} MiB of training state: " +
                          ", ".join(f"{k} {v / 2**20:,.1f}" for k, v in b.items()))
                log_metrics(dict(iter=iter_num, state_mib_per_rank=[{k: v / 2**20 for k, v in b.items()} for b in every]))
        iter_num += 1

    if master:
        metrics_file.close()
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def training_state_bytes(model, optimizer):
    """Bytes of parameters, gradients and optimizer state held by this process (its shards under FSDP)."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this process
    params = [local(p) for p in model.parameters()]
    state = [local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return dict(params=sum(t.numel() * t.element_size() for t in params),
                grads=sum(t.numel() * t.element_size() for t in params),  # one gradient per parameter element
                optimizer=sum(t.numel() * t.element_size() for t in state))


def gather_rng(world_size):
    """RNG states of every process (torch per rank; python and numpy from this one), as tensors and plain values."""
    np_state = np.random.get_state()
    state = dict(python=random.getstate(), numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]],
                 torch=[torch.get_rng_state()], cuda=[torch.cuda.get_rng_state()] if torch.cuda.is_available() else [])
    if world_size > 1:
        every = [None] * world_size
        dist.all_gather_object(every, (state["torch"][0], state["cuda"]))
        state["torch"] = [t for t, _ in every]
        state["cuda"] = [c[0] if c else None for _, c in every]
    return state


def restore_rng(state, rank, world_size):
    if not state:
        return
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    if len(state["torch"]) == world_size:  # same world size: every process continues its own stream
        torch.set_rng_state(state["torch"][rank])
        if torch.cuda.is_available() and state["cuda"] and state["cuda"][rank] is not None:
            torch.cuda.set_rng_state(state["cuda"][rank])


if __name__ == "__main__":
    run_main(main)
