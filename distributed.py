"""
The training processes and what they do together: who they are (Processes, from torchrun's environment), the
process group and the store of one launch attempt, the gathers and "rank 0 acts, every rank learns the error",
wrapping the model in DDP or FSDP2, building an FSDP model on the meta device without any process holding it
whole, what each process holds, and teardown.
"""

import gc
import os
import sys
import time
import uuid
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.nn as nn
import torch.distributed as dist

from errors import UserError
from model import GPT, GPTConfig

ATTEMPT_KEY = "train.py/attempt_store"  # in the torchrun agent's store: "<port> <token>" of the current attempt's store
ATTEMPT_WAIT = 600  # seconds a process waits for rank 0 of its attempt to publish the store


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


def restart_count():
    """How many times the launcher has started this run again: torchrun's --max-restarts count, or SLURM's
    requeue count (which torchrun's workers inherit); 0 for a first launch."""
    return max(int(os.environ.get(name, "0") or 0) for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def gather_from_every_rank(value, processes):
    """[value of rank 0, value of rank 1, ...]; [value] when alone."""
    if not processes.distributed:
        return [value]
    values = [None] * processes.world_size
    dist.all_gather_object(values, value)
    return values


def on_rank_0_for_all(action, catch=UserError, share=True):
    """action() on rank 0 alone; what it fails with (an exception of `catch`: a full disk, an unwritable folder) is
    raised on every process (share=False: on rank 0 alone, as from a background thread), so none is left waiting
    in a collective for rank 0."""
    distributed = dist.is_available() and dist.is_initialized()
    failure = None
    if not distributed or dist.get_rank() == 0:
        try:
            action()
        except catch as e:
            failure = e
    if distributed and share:
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
    if failure is not None:
        raise failure


# -----------------------------------------------------------------------------
# the process group

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


# -----------------------------------------------------------------------------
# the model across processes

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


def new_sharded_model(config: GPTConfig, shard: Callable[[GPT], None], device: str | torch.device,
                      initialise: bool = True) -> GPT:
    """
    GPT(config) as FSDP holds it, built without any process holding the whole model: on the meta device (no
    storage), then shard(model) (fully_shard's calls), then storage on `device` for this process's shards only,
    then init_sharded_weights. Under the same torch.manual_seed the weights are GPT(config)'s.
    initialise=False leaves the storage as it comes, for a checkpoint to fill (a resume).
    """
    with torch.device("meta"):
        model = GPT(config)
    shard(model)
    return materialise_sharded(model, device, initialise)


def materialise_sharded(model: GPT, device: str | torch.device, initialise: bool = True) -> GPT:
    """The second half of new_sharded_model, for a GPT built on the meta device and sharded already: storage on
    `device` for this process's shards, then (initialise) GPT()'s weights from the global RNG as it is now."""
    model.to_empty(device=device)
    if model.lm_head.weight is not model.transformer.wte.weight:  # to_empty replaces an unsharded tied weight twice
        model.lm_head.weight = model.transformer.wte.weight
    if initialise:
        init_sharded_weights(model)
    return model


def is_on_meta(model: nn.Module) -> bool:
    """Built under torch.device('meta'): shapes without storage, waiting for materialise_sharded."""
    return any(p.is_meta for p in model.parameters())


@torch.no_grad()
def init_sharded_weights(model: GPT) -> None:
    """
    Give a GPT built on the meta device (then sharded by FSDP's fully_shard and given storage by to_empty) the
    weights GPT(model.config) would have drawn from the global RNG in its present state, without any process
    holding the whole model: each tensor is drawn whole, one at a time, and each parameter keeps its own part
    (its shard when it is a DTensor). The draws are GPT()'s: first what constructing each Linear, Embedding and
    LayerNorm draws (replayed by constructing a like module), then _init_draws. So under the same
    torch.manual_seed the result equals GPT(config) exactly, and FSDP trains what one process would.
    """
    written = set()

    def keep(param: nn.Parameter, whole: torch.Tensor) -> None:
        if hasattr(param, "device_mesh"):  # a DTensor: this process's shard of the whole tensor
            from torch.distributed.tensor import distribute_tensor
            part = distribute_tensor(whole.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(part.to_local())
        else:
            param.copy_(whole)
        written.add(id(param))

    for module in model.modules():  # construction order: each layer initialises itself when made
        if isinstance(module, nn.Linear):
            like = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        elif isinstance(module, nn.Embedding):
            like = nn.Embedding(module.num_embeddings, module.embedding_dim)
        elif isinstance(module, nn.LayerNorm):
            like = nn.LayerNorm(module.normalized_shape, bias=module.bias is not None)
        else:
            continue
        for name, param in module.named_parameters(recurse=False):
            keep(param, getattr(like, name))
        del like
    for param, std in model._init_draws():
        whole = torch.empty(param.shape)
        keep(param, whole.normal_(mean=0.0, std=std) if std else whole.zero_())
    unwritten = [name for name, p in model.named_parameters() if id(p) not in written]
    if unwritten or any(True for _ in model.buffers()):
        raise RuntimeError(f"init_sharded_weights does not know how GPT() initialises {unwritten or 'its buffers'}")


def local_bytes(tensors):
    """Bytes this process stores for `tensors` (a DTensor's local shard under FSDP)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def gradient_bytes(model):
    """The gradient storage this process holds now: its .grad tensors (their shards under FSDP, which
    reduce-scatters every micro-step and so keeps no unsharded gradient between them)."""
    return local_bytes([p.grad for p in model.parameters() if p.grad is not None])


def training_state_bytes(model, optimizer, grads):
    """Bytes of parameters, gradients (`grads`: measured in the first step) and optimizer state held by this
    process (its shards under FSDP)."""
    moments = [v for per_param in optimizer.state.values() for v in per_param.values() if torch.is_tensor(v)]
    return dict(params=local_bytes(model.parameters()), grads=grads or 0, optimizer=local_bytes(moments))


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
