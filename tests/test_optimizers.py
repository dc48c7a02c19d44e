"""
Muon (--optimizer=muon) against references written here: a hand-written AdamW + Muon step in float64, an
uninterrupted run for resume, and one process for FSDP2's sharded parameters. (How well torch.optim.Muon's own
iteration orthogonalises is torch's to test: nothing here can change it.)
"""

import os
import sys
import subprocess
from types import SimpleNamespace

import pytest
import torch

import train
from configurator import read_settings
from common import UserError
from helpers import REPO, TINY_TRAIN_ARGS, assert_user_error, read_metrics, run_script, script_env, tiny_model
from optimizers import Muon, OptimizerGroup, muon_available

pytestmark = pytest.mark.skipif(not muon_available(), reason="torch.optim.Muon needs PyTorch >= 2.9")

QUINTIC = (3.4445, -4.7750, 2.0315)  # Muon's Newton-Schulz coefficients (Jordan et al.)


# -----------------------------------------------------------------------------
# one step of train.py's optimizer against a hand-written one

def reference_newton_schulz(G, steps=5):
    """The quintic iteration of Jordan et al. in float64: X <- aX + (bA + cA^2)X with A = XX^T, on the wide orientation."""
    a, b, c = QUINTIC
    X = G.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / X.norm()
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def muon_settings(**overrides):
    defaults = vars(read_settings(dict(vars(train)), []))
    return SimpleNamespace(**{**defaults, "optimizer": "muon", "fsdp": False, **overrides})


def test_one_step_matches_a_hand_written_adamw_and_muon_step(monkeypatch):
    """Two steps of train.py's optimizer against AdamW and Muon written out in float64. Newton-Schulz is the
    float64 iteration here on both sides: in bfloat16 (torch's) it leaves rounding noise in the directions of
    a gradient's small singular values, amplified ~3.4^5 times (the tests above hold it to its promise), and
    an exact comparison of everything else needs the same orthogonalisation on both sides."""
    import torch.optim._muon as torch_muon
    calls = []
    def float64_newton_schulz(G, coefficients, steps, eps):
        calls.append((tuple(G.shape), coefficients, steps))
        return reference_newton_schulz(G, steps).to(G.dtype)
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", float64_newton_schulz)
    model = tiny_model(rope=False).train()
    settings = muon_settings(learning_rate=3e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, muon_lr=0.05,
                             muon_momentum=0.9, muon_ns_steps=4, muon_weight_decay=0.5, warmup_iters=2,
                             lr_decay_iters=10, min_lr=3e-4)
    optimizer = train.build_optimizer(model, settings, "cpu")
    assert isinstance(optimizer, OptimizerGroup)
    matrices = {name for name, p in model.named_parameters() if name.startswith("transformer.h.") and p.dim() == 2}
    assert matrices == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    momentum = {}
    for step in range(2):  # the second step uses the first one's momentum and moments
        before = {name: p.detach().double().clone() for name, p in model.named_parameters()}
        train.set_learning_rates(optimizer, step + 3, settings)  # past the warmup: each rate its own fraction of its peak
        factor = train.lr_at(step + 3, 1.0, 2, 10, 0.1)
        assert 0.1 < factor < 1
        model.zero_grad()
        model(idx, idx)[1].backward()
        grads = {name: p.grad.double().clone() for name, p in model.named_parameters()}
        optimizer.step()
        for name, p in model.named_parameters():
            g, w = grads[name], before[name]
            if name in matrices:
                lr = 0.05 * factor
                buf = momentum[name] = 0.9 * momentum.get(name, torch.zeros_like(g)) + 0.1 * g
                update = reference_newton_schulz(0.1 * g + 0.9 * buf, steps=4)  # Nesterov
                expected = w * (1 - lr * 0.5) - lr * max(1, g.shape[0] / g.shape[1]) ** 0.5 * update
            else:
                lr = 3e-3 * factor
                m1, m2 = momentum.get(name, (torch.zeros_like(g), torch.zeros_like(g)))
                m1, m2 = 0.9 * m1 + 0.1 * g, 0.95 * m2 + 0.05 * g * g
                momentum[name] = (m1, m2)
                t = step + 1
                decay = 0.1 if p.dim() >= 2 else 0.0  # embeddings decay, norms and biases do not
                expected = w * (1 - lr * decay) - lr * (m1 / (1 - 0.9 ** t)) / ((m2 / (1 - 0.95 ** t)).sqrt() + 1e-8)
            assert (expected - w).abs().max() > 0.1 * lr  # a step the comparison can see
            torch.testing.assert_close(p.detach().double(), expected, atol=1e-3 * lr, rtol=1e-5, msg=name)
    assert len(calls) == 2 * len(matrices) and all(c[1:] == (QUINTIC, 4) for c in calls)


def test_adamw_learning_rates_are_exactly_the_schedule():
    """Giving every group a peak_lr changed nothing for AdamW alone: its lr is lr_at's, bit for bit."""
    settings = muon_settings(optimizer="adamw", learning_rate=7e-4, min_lr=7e-5, warmup_iters=3, lr_decay_iters=17)
    optimizer = train.build_optimizer(tiny_model(), settings, "cpu")
    for step in (0, 2, 5, 11, 30):
        train.set_learning_rates(optimizer, step, settings)
        assert {g["lr"] for g in optimizer.param_groups} == {train.lr_at(step, 7e-4, 3, 17, 7e-5)}


# -----------------------------------------------------------------------------
# train.py with --optimizer=muon

def train_args(data_root, out_dir, *extra):
    return [*TINY_TRAIN_ARGS, f"--data_root={data_root}", f"--out_dir={out_dir}", "--optimizer=muon", "--muon_lr=0.02",
            "--dropout=0.1", "--eval_interval=4", *extra]


def final_state(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def test_resume_is_bitwise_exact_with_muon(data_root, tmp_path):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    run_script(*train_args(data_root, whole, "--max_iters=10"), check=True)
    run_script(*train_args(data_root, parts, "--max_iters=4"), check=True)
    run_script(*train_args(data_root, parts, "--max_iters=10", "--init_from=resume"), check=True)
    losses = lambda out: {r["iter"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert losses(parts) == losses(whole)
    a, b = final_state(whole), final_state(parts)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    # the checkpoint holds Muon's momentum for the block matrices and AdamW's moments for the rest
    state = a["optimizer"]["state"]
    assert set(state["transformer.h.0.mlp.c_fc.weight"]) == {"momentum_buffer"}
    assert {"exp_avg", "exp_avg_sq"} <= set(state["transformer.wte.weight"])
    # and Muon trained differently from AdamW on the same batches
    adamw = str(tmp_path / "adamw")
    run_script(*train_args(data_root, adamw, "--max_iters=10", "--optimizer=adamw"), check=True)
    assert losses(adamw)[9] != losses(whole)[9]


def test_resume_with_the_other_optimizer_is_refused(data_root, tmp_path):
    out = str(tmp_path)
    run_script(*train_args(data_root, out, "--max_iters=4"), check=True)
    before = os.path.getmtime(os.path.join(out, "ckpt.pt"))
    result = run_script(*train_args(data_root, out, "--max_iters=8", "--init_from=resume", "--optimizer=adamw"))
    assert_user_error(result, "--optimizer=muon", "resume with --optimizer=muon")
    assert os.path.getmtime(os.path.join(out, "ckpt.pt")) == before


@pytest.mark.parametrize("key, bad", [("optimizer", "sgd"), ("muon_lr", 0.0), ("muon_lr", float("nan")),
                                      ("muon_momentum", 1.0), ("muon_momentum", -0.1), ("muon_ns_steps", 0),
                                      ("muon_ns_steps", 100), ("muon_weight_decay", -1.0)])
def test_muon_settings_out_of_range_are_refused(key, bad):
    train.validate_settings(muon_settings())
    with pytest.raises(UserError, match=key):
        train.validate_settings(muon_settings(**{key: bad}))


def test_muon_settings_matter_only_with_muon():
    train.validate_settings(muon_settings(optimizer="adamw", muon_lr=-1.0, muon_ns_steps=0))


# -----------------------------------------------------------------------------
# FSDP2's sharded parameters (DTensors), in this process: a one-process group for the arithmetic, and
# PyTorch's fake two-process group (collectives counted, nothing sent) for the communication

def process_group(world_size):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    if world_size == 1:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    else:
        fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
        dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=world_size)
    return init_device_mesh("cpu", (world_size,))


@pytest.fixture()
def leave_no_process_group():
    yield
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def sharded_matrices(mesh, shapes, seed):
    from torch.distributed.tensor import Shard, distribute_tensor
    g = torch.Generator().manual_seed(seed)
    plain = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in plain]
    return plain, sharded, g


def give_gradients(plain, sharded, mesh, g):
    from torch.distributed.tensor import Shard, distribute_tensor
    for p, q in zip(plain, sharded):
        grad = torch.randn(p.shape, generator=g)
        p.grad = grad.clone()
        q.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])


SETTINGS = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, ns_steps=5)


def test_sharded_parameters_step_like_plain_ones(leave_no_process_group):
    """optimizers.Muon's path for DTensors does torch.optim.Muon's arithmetic, bit for bit, momentum sharded."""
    from torch.distributed.tensor import Shard
    mesh = process_group(1)
    plain, sharded, g = sharded_matrices(mesh, [(48, 16), (16, 64)], seed=0)
    reference, under_test = torch.optim.Muon(plain, **SETTINGS), Muon(sharded, **SETTINGS)
    for _ in range(2):  # the second step uses the first one's momentum
        give_gradients(plain, sharded, mesh, g)
        reference.step()
        under_test.step()
        for p, q in zip(plain, sharded):
            assert torch.equal(q.full_tensor(), p.detach())
    assert under_test.state[sharded[0]]["momentum_buffer"].placements == (Shard(0),)


def test_sharded_parameters_gather_each_update_once(leave_no_process_group):
    """Two processes: one all-gather per matrix per step and nothing else (torch's own step on DTensors makes
    every product of the iteration collectives: 12 all-reduces and 15 all-gathers for these two matrices)."""
    from torch.distributed.tensor.debug import CommDebugMode
    mesh = process_group(2)
    plain, sharded, g = sharded_matrices(mesh, [(48, 16), (16, 64)], seed=1)
    optimizer = Muon(sharded, **SETTINGS)
    give_gradients(plain, sharded, mesh, g)
    with CommDebugMode() as comm:
        optimizer.step()
    assert {str(op): n for op, n in comm.get_comm_counts().items()} == {"c10d_functional.all_gather_into_tensor": 2}


def test_two_processes_step_like_one(tmp_path, monkeypatch):
    """FSDP2 on 2 real processes (gloo): optimizers.Muon orthogonalises each matrix's whole update, not each
    process's rows of it, so 2 steps leave the weights one process leaves (Newton-Schulz in float64 on both
    sides; what is left is the order of the gradient's summation)."""
    import torch.optim._muon as torch_muon
    from model import GPT
    from float64_newton_schulz import float64_newton_schulz
    from muon_fsdp_worker import MUON_CONFIG, MUON_SEED, MUON_SETTINGS, MUON_STEPS, batch, muon_matrices
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/muon_fsdp_worker.py", str(tmp_path)], cwd=REPO, env=script_env(),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    sharded = torch.load(tmp_path / "fsdp_muon.pt", weights_only=True)
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", float64_newton_schulz)
    torch.manual_seed(MUON_SEED)
    model = GPT(MUON_CONFIG)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = Muon(muon_matrices(model), **MUON_SETTINGS)
    for step in range(MUON_STEPS):
        model(*batch(step))[1].backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    assert sharded.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        if p.dim() == 2 and name.startswith("transformer.h."):
            assert (p.detach() - initial[name]).abs().max() > 1e-2, name  # a step the comparison can see
        torch.testing.assert_close(sharded[name], p.detach(), atol=1e-5, rtol=1e-5, msg=name)
