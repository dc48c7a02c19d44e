"""
A tiny run for tests/test_sharded_checkpoint.py, alone or under torchrun (gloo, CPU):

    python tests/sharded_checkpoint_worker.py save OUT      # under torchrun: FSDP; alone: one process
    python tests/sharded_checkpoint_worker.py load OUT [ddp]
    python tests/sharded_checkpoint_worker.py held OUT      # under torchrun

save: builds the model (under FSDP on the meta device, sharded, then initialised shard by shard), trains 2 AdamW
steps, and writes what the test compares: OUT/init.pt (the initial weights, gathered), OUT/step2.pt (the model and
optimizer state at step 2 gathered into one file, as the one-file checkpoint does), OUT/sync.dcp (saved
synchronously at step 2) and OUT/async.dcp (saved asynchronously at step 2, then a third step trains at once,
whose state is OUT/step3.pt).
load: builds the model on this world size (FSDP, or DDP with `ddp`, or one process), restores OUT/sync.dcp into it
and its optimizer, and writes them gathered to OUT/loaded_<world size>[_ddp].pt.
held: trains one step, saves OUT/held.dcp and loads it back with every call to DCP's save and load watched, and
writes what each rank handed DCP to OUT/held_<rank>.json: per tensor, whether it is a DTensor, its local and its
whole number of elements.
"""

import os
import sys
import json

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, StateDictOptions

from model import GPT, GPTConfig
from distributed import new_sharded_model
from sharded_checkpoint import ShardedCheckpointer, load_training_state

CONFIG = GPTConfig(block_size=16, vocab_size=67, n_layer=2, n_head=2, n_embd=16, dropout=0.0)  # 67: uneven shards
SEED = 1234


def build(distributed, ddp):
    torch.manual_seed(SEED)
    if distributed and not ddp:
        from torch.distributed.fsdp import fully_shard

        def shard(model):
            for block in model.transformer.h:
                fully_shard(block)
            fully_shard(model)
        model = new_sharded_model(CONFIG, shard, "cpu")
        return model, model
    model = GPT(CONFIG)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        return model, DistributedDataParallel(model)
    return model, model


def train_step(runner, optimizer, step):
    """The same global batch on any world size: rank r takes its rows of it."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    x = torch.randint(0, CONFIG.vocab_size, (6, CONFIG.block_size + 1), generator=torch.Generator().manual_seed(step))
    rows = x[rank * 6 // world:(rank + 1) * 6 // world]
    _, loss = runner(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def gathered(model, optimizer):
    """The model and optimizer state whole, as the one-file checkpoint gathers them."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return dict(model=model_sd, optimizer=optim_sd.get("state"))  # rank 0 holds it; the others get nothing


def tensors_of(state, prefix=""):
    """(dotted name, tensor) for every tensor of a nested state dict."""
    for key, value in state.items():
        if isinstance(value, dict):
            yield from tensors_of(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            yield prefix + str(key), value


def watch_dcp(calls):
    """Record, for every dcp.save and dcp.load, what this process hands DCP: per tensor [is a DTensor, the
    elements this process holds, the elements of the whole tensor]."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    def watched(name, real):
        def call(state, *args, **kwargs):
            calls.append(dict(call=name, tensors={key: [isinstance(t, DTensor), (t.to_local() if isinstance(t, DTensor) else t).numel(),
                                                        t.numel()] for key, t in tensors_of(state)}))
            return real(state, *args, **kwargs)
        return call
    dcp.save, dcp.load = watched("save", dcp.save), watched("load", dcp.load)


def main():
    mode, out = sys.argv[1], sys.argv[2]
    ddp = sys.argv[3:] == ["ddp"]
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    model, runner = build(distributed, ddp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=False)
    values = dict(model_args=CONFIG.to_dict(), iter_num=2, world_size=world)
    if mode == "held":
        train_step(runner, optimizer, 0)
        calls = []
        watch_dcp(calls)
        ShardedCheckpointer().save(os.path.join(out, "held.dcp"), model, optimizer, values)
        load_training_state(os.path.join(out, "held.dcp"), model, optimizer)
        with open(os.path.join(out, f"held_{rank}.json"), "w") as f:
            json.dump(calls, f)
    elif mode == "save":
        init = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        for step in range(2):
            train_step(runner, optimizer, step)
        state = gathered(model, optimizer)
        if rank == 0:
            torch.save(init, os.path.join(out, "init.pt"))
            torch.save(state, os.path.join(out, "step2.pt"))
        ShardedCheckpointer().save(os.path.join(out, "sync.dcp"), model, optimizer, values)
        checkpointer = ShardedCheckpointer(asynchronous=True)
        checkpointer.save(os.path.join(out, "async.dcp"), model, optimizer, values)
        train_step(runner, optimizer, 2)  # while the save is in flight: the weights and moments change
        checkpointer.close()
        state = gathered(model, optimizer)
        if rank == 0:
            torch.save(state, os.path.join(out, "step3.pt"))
    else:
        restored = load_training_state(os.path.join(out, "sync.dcp"), model, optimizer)
        assert restored["iter_num"] == 2
        state = gathered(model, optimizer)
        if rank == 0:
            torch.save(state, os.path.join(out, f"loaded_{world}{'_ddp' if ddp else ''}.pt"))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
