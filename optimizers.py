"""
The optimizers train.py steps, beside plain AdamW (model.GPT.configure_optimizers builds them all):

- Muon: torch.optim.Muon (PyTorch >= 2.9), also on FSDP2's sharded parameters, where it orthogonalises
  each matrix's whole update (see Muon.step).
- OptimizerGroup: several optimizers over disjoint parameters that the training loop, the GradScaler, the
  learning-rate schedule and torch.distributed.checkpoint see as one.

Muon (Jordan et al., https://kellerjordan.github.io/posts/muon/): momentum on the gradient of a weight
matrix, then the update replaced by an approximately orthogonal matrix with the same singular vectors
(a quintic Newton-Schulz iteration in bfloat16, which leaves the singular values roughly in [0.7, 1.2]).
"""

import torch


def muon_available():
    return hasattr(torch.optim, "Muon")


def _sharded(p):
    return hasattr(p, "full_tensor")  # a DTensor: FSDP2 holds a shard of it (dim 0) on each process


class Muon(torch.optim.Muon if muon_available() else object):
    """
    torch.optim.Muon. On plain tensors (one process, DDP) it is torch's own step. On FSDP2's DTensors torch's
    step also runs, through DTensor's operator rules, and trains the same run (within 1e-5 of one process with
    Newton-Schulz in float64, measured), but every matrix product of the iteration becomes collectives: one
    step on two small matrices made 12 all-reduces and 15 all-gathers (CommDebugMode). So a sharded parameter
    takes this path: the momentum and the Nesterov blend stay sharded (elementwise), the blended update of each
    matrix is all-gathered once (in fp32), every process orthogonalises the whole matrix with torch's own
    iteration, and keeps its rows. Per step that is one all-gather of each Muon matrix and, transiently, one
    whole matrix per process.
    """

    @torch.no_grad()
    def step(self, closure=None):
        if not any(_sharded(p) for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        from torch.optim._muon import _zeropower_via_newtonschulz, _adjust_lr  # torch.optim.Muon's own arithmetic
        from torch.distributed.tensor import DTensor, Replicate
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                whole = _zeropower_via_newtonschulz(update.full_tensor(), group["ns_coefficients"], group["ns_steps"],
                                                    group["eps"])
                # replicated -> the parameter's sharding is a local slice on each process, no communication
                mine = DTensor.from_local(whole, p.device_mesh, [Replicate()] * p.device_mesh.ndim,
                                          run_check=False).redistribute(p.device_mesh, p.placements)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(mine, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


class OptimizerGroup:
    """
    Optimizers over disjoint parameters, stepped together. param_groups lists every optimizer's groups (the
    same dicts: setting a group's lr sets it in its optimizer), so GradScaler.unscale_/step and the schedule
    need nothing else; iterating yields the optimizers, which is what torch.distributed.checkpoint's
    get_state_dict / set_optimizer_state_dict take for several optimizers.
    """

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def __iter__(self):
        return iter(self.optimizers)

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self):
        return {p: s for optimizer in self.optimizers for p, s in optimizer.state.items()}

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict):
        if len(state_dict["optimizers"]) != len(self.optimizers):
            raise ValueError(f"the state holds {len(state_dict['optimizers'])} optimizers, this group {len(self.optimizers)}")
        for optimizer, own in zip(self.optimizers, state_dict["optimizers"]):
            optimizer.load_state_dict(own)
