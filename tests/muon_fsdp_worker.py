"""
optimizers.Muon on FSDP2's sharded parameters, for tests/test_muon.py, under torchrun (gloo, CPU):

    torchrun --standalone --nproc_per_node=2 tests/muon_fsdp_worker.py OUT

builds GPT(MUON_CONFIG) from MUON_SEED sharded with fully_shard (each block, then the model), steps Muon over the block
matrices twice on the global batches of `batch(step)` (rank r takes its rows; FSDP averages the gradients), with
Newton-Schulz in float64, and writes the whole weights to OUT/fsdp_muon.pt. The test makes the same steps on one
process and compares.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from model import GPTConfig
from optimizers import Muon
from distributed import new_sharded_model
from float64_newton_schulz import use_float64_newton_schulz

MUON_CONFIG = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
MUON_SEED = 4321
MUON_STEPS = 2
MUON_SETTINGS = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, ns_steps=5)


def muon_matrices(model):
    """The parameters train.py gives Muon: the 2-D weights of the blocks."""
    return [p for name, p in model.named_parameters() if name.startswith("transformer.h.") and p.dim() == 2]


def batch(step):
    """The global batch of a step: 4 rows, the same on any number of processes."""
    x = torch.randint(0, MUON_CONFIG.vocab_size, (4, MUON_CONFIG.block_size + 1), generator=torch.Generator().manual_seed(step))
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def main():
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    use_float64_newton_schulz()

    def shard(model):
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    torch.manual_seed(MUON_SEED)
    model = new_sharded_model(MUON_CONFIG, shard, "cpu")
    optimizer = Muon(muon_matrices(model), **MUON_SETTINGS)
    for step in range(MUON_STEPS):
        x, y = batch(step)
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        model(x[rows], y[rows])[1].backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    whole = {name: p.full_tensor() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save(whole, os.path.join(sys.argv[1], "fsdp_muon.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
