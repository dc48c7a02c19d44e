"""
Sharded checkpoints (sharded_checkpoint.py) and FSDP's meta-device initialisation (distributed.new_sharded_model), each
against an independent reference: GPT(config) for the initial weights, the one-file checkpoint's gathered state
for what the shards hold, the state at the save call for an asynchronous save, the previous checkpoint for a
save killed half way, and the same scripts on the one-file format for every reader.
"""

import os
import sys
import json
import pickle
import signal
import subprocess

import pytest
import torch

from helpers import CHILD_TIMEOUT, REPO, RunsCode, fill, run_script, script_env, torchrun
from common import UserError
from checkpoint import load_checkpoint, save_checkpoint, sharded_path, remove_sharded_twin
from model import GPT, GPTConfig
from distributed import new_sharded_model
from sharded_checkpoint import ShardedCheckpointer, load_training_state, read_index


def trained_tiny(seed=0, **config):
    """A tiny GPT and its AdamW after one step, so that the optimizer has moments to save."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**dict(dict(block_size=16, vocab_size=67, n_layer=2, n_head=2, n_embd=16), **config)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, model.config.vocab_size, (2, model.config.block_size + 1))
    _, loss = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def copy_state(model, optimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()])


def assert_state_equal(model, optimizer, state):
    weights, moments = state
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert len(optimizer.state) == len(moments)
    for got, want in zip(optimizer.state.values(), moments):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key


# -----------------------------------------------------------------------------
# meta-device initialisation

@pytest.mark.parametrize("config", [dict(), dict(rope=True, n_kv_head=1, bias=False), dict(vocab_size=65, n_layer=3)])
def test_meta_initialisation_is_gpt_initialisation(config):
    """Built on the meta device and initialised tensor by tensor, the model is GPT(config)'s, exactly, with the
    global RNG left where GPT() leaves it and the embedding still tied to the output layer."""
    config = GPTConfig(**dict(dict(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32), **config))
    torch.manual_seed(7)
    reference, after_reference = GPT(config).state_dict(), torch.rand(3)
    torch.manual_seed(7)
    model = new_sharded_model(config, lambda m: None, "cpu")
    assert torch.equal(torch.rand(3), after_reference)
    assert model.lm_head.weight is model.transformer.wte.weight
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for name in reference:
        assert torch.equal(state[name], reference[name]), name
    torch.manual_seed(8)  # and the weights follow the seed
    assert not torch.equal(new_sharded_model(config, lambda m: None, "cpu").transformer.wte.weight,
                           reference["transformer.wte.weight"])


# -----------------------------------------------------------------------------
# one process: the format, the atomic switch, the asynchronous save, the readers

@pytest.mark.parametrize("asynchronous", [False, True])
def test_one_process_round_trip(tmp_path, asynchronous):
    model, optimizer = trained_tiny()
    path = str(tmp_path / "ckpt.dcp")
    checkpointer = ShardedCheckpointer(asynchronous=asynchronous)
    values = dict(model_args=model.config.to_dict(), iter_num=1, best_val_loss=float("inf"), chars=None)
    checkpointer.save(path, model, optimizer, values)
    saved = copy_state(model, optimizer)
    with torch.no_grad():  # what an asynchronous save holds is the state at its call, not what training does next
        for p in model.parameters():
            p.add_(1.0)
    for s in optimizer.state.values():
        s["exp_avg"].add_(1.0)
    values["iter_num"] = 99  # and its values were taken at the call too
    checkpointer.close()

    whole = load_checkpoint(str(tmp_path / "ckpt.pt"))  # the one-file path finds its sharded twin
    assert whole["iter_num"] == 1 and whole["best_val_loss"] == float("inf") and whole["chars"] is None
    assert whole["model"].keys() == saved[0].keys()
    for name, value in whole["model"].items():
        assert torch.equal(value, saved[0][name]), name
    fresh, fresh_optimizer = trained_tiny(seed=1)
    assert load_training_state(path, fresh, fresh_optimizer)["iter_num"] == 1
    assert_state_equal(fresh, fresh_optimizer, saved)

    ShardedCheckpointer().save(path, model, optimizer, dict(values, iter_num=2))  # a second save replaces the first
    assert [n for n in os.listdir(path) if n.startswith("step-")] == [read_index(path)["shards"]]
    assert load_checkpoint(path)["iter_num"] == 2


def test_the_newer_format_is_read_when_both_are_there(tmp_path):
    """A run that moved between FSDP and one process leaves both files until its next save: the newer wins."""
    model, optimizer = trained_tiny()
    values = dict(model_args=model.config.to_dict(), iter_num=1)
    ShardedCheckpointer().save(sharded_path(str(tmp_path / "ckpt.pt")), model, optimizer, values)
    os.utime(tmp_path / "ckpt.dcp" / "checkpoint.json", ns=(1, 1))
    save_checkpoint(dict(model=model.state_dict(), **dict(values, iter_num=2)), str(tmp_path / "ckpt.pt"))
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == 2
    ShardedCheckpointer().save(sharded_path(str(tmp_path / "ckpt.pt")), model, optimizer, dict(values, iter_num=3))
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == 3
    # and a writer removes the other format once its own is in place
    ShardedCheckpointer().save(sharded_path(str(tmp_path / "ckpt.pt")), model, optimizer, dict(values, iter_num=4),
                               replaces=str(tmp_path / "ckpt.pt"))
    assert not (tmp_path / "ckpt.pt").exists() and load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == 4
    save_checkpoint(dict(model=model.state_dict(), **dict(values, iter_num=5)), str(tmp_path / "ckpt.pt"))
    remove_sharded_twin(str(tmp_path / "ckpt.pt"))
    assert not (tmp_path / "ckpt.dcp").exists() and load_checkpoint(str(tmp_path / "ckpt.pt"))["iter_num"] == 5


# a child that saves versions 1, 2, 3 of a checkpoint and stops inside the save of version 3 at `where`, says so,
# and waits to be killed: shards written but not DCP's index (metadata), all written but checkpoint.json not
# switched (index), or switched but the old step folder not yet removed (cleanup)
CHILD_SAVER = """
import os, sys, time, shutil
sys.path.insert(0, {repo!r})
import torch
import torch.distributed.checkpoint as dcp
import sharded_checkpoint
from model import GPT, GPTConfig
where, version = {where!r}, 0
def stall(point):
    print("stalled", point, flush=True)
    time.sleep(600)
real_finish, real_replace, real_rmtree = dcp.FileSystemWriter.finish, os.replace, shutil.rmtree
def finish(self, *a, **k):
    if version == 3 and where == "metadata":
        stall(where)
    return real_finish(self, *a, **k)
def replace(src, dst):
    if version == 3 and where == "index":
        stall(where)
    real_replace(src, dst)
def rmtree(path, *a, **k):
    if version == 3 and where == "cleanup":
        stall(where)
    real_rmtree(path, *a, **k)
dcp.FileSystemWriter.finish = finish
sharded_checkpoint.os.replace = replace
sharded_checkpoint.shutil.rmtree = rmtree
model = GPT(GPTConfig(block_size=16, vocab_size=67, n_layer=2, n_head=2, n_embd=16))
checkpointer = sharded_checkpoint.ShardedCheckpointer()
for version in range(1, 4):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(version))
    checkpointer.save({path!r}, model, None, dict(model_args=model.config.to_dict(), iter_num=version))
    print(version, flush=True)
"""


@pytest.mark.parametrize("where", ["metadata", "index", "cleanup"])
def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path, where):
    path = str(tmp_path / "ckpt.dcp")
    proc = subprocess.Popen([sys.executable, "-c", CHILD_SAVER.format(repo=REPO, path=path, where=where)],
                            stdout=subprocess.PIPE, text=True, env=script_env())
    try:
        lines = [proc.stdout.readline().strip() for _ in range(3)]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert lines == ["1", "2", f"stalled {where}"], lines
    assert len([n for n in os.listdir(path) if n.startswith("step-")]) == 2  # the new one was being written
    expected = 3 if where == "cleanup" else 2  # switched already: the new one is whole
    checkpoint = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert checkpoint["iter_num"] == expected
    assert all(torch.all(v == float(expected)) for v in checkpoint["model"].values())
    # the next save clears what the killed one left
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    ShardedCheckpointer().save(path, model, None, dict(model_args=model.config.to_dict(), iter_num=4))
    assert [n for n in os.listdir(path) if n.startswith("step-")] == [read_index(path)["shards"]]
    assert load_checkpoint(path)["iter_num"] == 4


def test_damaged_or_crafted_sharded_checkpoints_are_user_errors(tmp_path):
    model, optimizer = trained_tiny()
    path = str(tmp_path / "ckpt.dcp")
    ShardedCheckpointer().save(path, model, optimizer, dict(model_args=model.config.to_dict(), iter_num=1))
    index_path = os.path.join(path, "checkpoint.json")
    shards = os.path.join(path, read_index(path)["shards"])
    good_index = open(index_path).read()

    marker = tmp_path / "code_ran"  # DCP's index is a pickle: one that would run code is refused, unrun
    original = open(os.path.join(shards, ".metadata"), "rb").read()
    with open(os.path.join(shards, ".metadata"), "wb") as f:
        pickle.dump(RunsCode(str(marker)), f)
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    with open(os.path.join(shards, ".metadata"), "wb") as f:
        f.write(original[:len(original) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(path)
    with open(os.path.join(shards, ".metadata"), "wb") as f:
        f.write(original)
    assert load_checkpoint(path)["iter_num"] == 1

    for damage, message in [("{not json", "damaged"), (json.dumps(dict(model_args={}, shards="../elsewhere")), "not in"),
                            (json.dumps(dict(shards=1)), "not a sharded checkpoint")]:
        with open(index_path, "w") as f:
            f.write(damage)
        with pytest.raises(UserError, match=message):
            load_checkpoint(path)
    with open(index_path, "w") as f:
        f.write(good_index)
    other = GPT(GPTConfig(block_size=16, vocab_size=67, n_layer=3, n_head=2, n_embd=16))
    with pytest.raises(UserError, match="do not fit"):
        load_training_state(path, other)


HELLASWAG_EXAMPLE = {"ind": 1, "activity_label": "Cat", "ctx_a": "The cat", "ctx_b": "", "ctx": "The cat",
                     "split": "val", "split_type": "indomain", "label": 2,
                     "endings": ["sat.", "ran away.", "sat on the mat.", "slept."], "source_id": "test~1"}


@pytest.fixture(scope="module")
def both_formats(tmp_path_factory):
    """The same small GPT-2 BPE model as a one-file checkpoint and as a sharded one."""
    root = tmp_path_factory.mktemp("formats")
    model, optimizer = trained_tiny(vocab_size=50304, block_size=32)
    values = dict(model_args=model.config.to_dict(), iter_num=5, best_val_loss=3.0, config={}, chars=None)
    os.makedirs(root / "file")
    save_checkpoint(dict(model=model.state_dict(), **values), str(root / "file" / "ckpt.pt"))
    ShardedCheckpointer().save(str(root / "sharded" / "ckpt.dcp"), model, optimizer, values)
    with open(root / "hellaswag.jsonl", "w") as f:
        f.write(json.dumps(HELLASWAG_EXAMPLE) + "\n")
    return root


SCRIPTS = {
    "sample.py": lambda out, root: ["sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=1",
                                    "--max_new_tokens=12", "--stream=False", "--start=Hello"],
    "export_hf.py": lambda out, root: ["export_hf.py", f"--out_dir={out}"],
    "eval_hellaswag.py": lambda out, root: ["eval_hellaswag.py", f"--out_dir={out}", "--device=cpu",
                                            f"--data_path={root / 'hellaswag.jsonl'}",
                                            f"--predictions_path={out}/predictions.jsonl"],
}

REPORTED_ON = {"sample.py": "stderr", "export_hf.py": "stdout", "eval_hellaswag.py": "stdout"}  # "read <checkpoint> (step N, ...)"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_reader_takes_a_sharded_checkpoint_on_one_process(both_formats, script):
    """Each script on the sharded checkpoint, alone (no torchrun), does what it does on the one-file checkpoint."""
    results, reports = {}, {}
    for kind in ("file", "sharded"):
        out = both_formats / kind
        result = run_script(*SCRIPTS[script](out, both_formats), timeout=CHILD_TIMEOUT)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Warning" not in result.stderr, result.stderr
        results[kind] = result.stdout.replace(str(out), "OUT")
        reports[kind] = getattr(result, REPORTED_ON[script]).replace(str(out), "OUT")
    # every script names the checkpoint it read: for the sharded one, its folder
    assert "read OUT/ckpt.pt (step 5" in reports["file"], reports["file"]
    assert "read OUT/ckpt.dcp (step 5" in reports["sharded"], reports["sharded"]
    assert results["sharded"].replace("OUT/ckpt.dcp", "OUT/ckpt.pt") == results["file"]
    if script == "export_hf.py":
        for name in ("model.safetensors", "config.json"):
            assert (both_formats / "sharded" / "hf" / name).read_bytes() == (both_formats / "file" / "hf" / name).read_bytes()
    if script == "eval_hellaswag.py":
        assert ((both_formats / "sharded" / "predictions.jsonl").read_text()
                == (both_formats / "file" / "predictions.jsonl").read_text() != "")


# -----------------------------------------------------------------------------
# several processes (gloo): FSDP's shards, written by each rank, read on any world size

WORKER = "tests/sharded_checkpoint_worker.py"

@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    result = torchrun(2, WORKER, "save", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def load_gathered(path):
    return torch.load(path, weights_only=True)


def assert_same(a, b):
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["optimizer"].keys() == b["optimizer"].keys() and a["optimizer"]
    for name in a["optimizer"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["optimizer"][name][key], b["optimizer"][name][key]), (name, key)


@pytest.mark.slow
def test_fsdp_meta_initialisation_and_shards(fsdp_run):
    """Under FSDP on 2 processes: the initial weights are GPT()'s from the same seed; each rank wrote its own
    half of the shards; the shards read whole on one process are the one-file checkpoint's state; the
    asynchronous save holds step 2's state though step 3 trained while it was written."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from sharded_checkpoint_worker import CONFIG, SEED
    torch.manual_seed(SEED)
    reference = GPT(CONFIG).state_dict()
    init = load_gathered(fsdp_run / "init.pt")
    assert init.keys() == reference.keys()
    for name in reference:
        assert torch.equal(init[name], reference[name]), name

    step2, step3 = load_gathered(fsdp_run / "step2.pt"), load_gathered(fsdp_run / "step3.pt")
    assert not torch.equal(step2["model"]["transformer.wte.weight"], step3["model"]["transformer.wte.weight"])
    for name in ("sync.dcp", "async.dcp"):
        index = read_index(str(fsdp_run / name))
        assert index["world_size"] == 2 and index["iter_num"] == 2
        shards = fsdp_run / name / index["shards"]
        sizes = [os.path.getsize(shards / f"__{rank}_0.distcp") for rank in range(2)]
        assert abs(sizes[0] - sizes[1]) < 0.2 * sum(sizes), sizes  # each rank wrote its own half
        whole = load_checkpoint(str(fsdp_run / name))
        for key, value in step2["model"].items():
            assert torch.equal(whole["model"][key], value), (name, key)
    # and the optimizer's moments, restored on one process from what 2 wrote
    model = GPT(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_training_state(str(fsdp_run / "async.dcp"), model, optimizer)
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    assert_same(dict(model=model_sd, optimizer=optim_sd["state"]), step2)


@pytest.mark.slow
@pytest.mark.parametrize("nproc,mode", [(3, "fsdp"), (2, "ddp"), (1, "alone")])
def test_fsdp_shards_load_on_another_world_size(fsdp_run, nproc, mode):
    """Written by FSDP on 2 processes, restored (model and AdamW's moments) by FSDP on 3, by DDP on 2 and by one
    process: the same state as the one-file checkpoint of the run."""
    if mode == "alone":
        result = run_script(WORKER, "load", str(fsdp_run), timeout=CHILD_TIMEOUT)
    else:
        result = torchrun(nproc, WORKER, "load", str(fsdp_run), *(["ddp"] if mode == "ddp" else []))
    assert result.returncode == 0, result.stdout + result.stderr
    loaded = load_gathered(fsdp_run / f"loaded_{nproc}{'_ddp' if mode == 'ddp' else ''}.pt")
    assert_same(loaded, load_gathered(fsdp_run / "step2.pt"))


def test_each_rank_saves_and_loads_only_its_own_shards(tmp_path):
    """Under FSDP on 2 processes, what each rank hands DCP to save and to load is its shards (DTensors holding
    about half of each weight and moment), never a gathered copy: together the ranks hold each element once."""
    result = torchrun(2, WORKER, "held", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    calls = [json.loads((tmp_path / f"held_{rank}.json").read_text()) for rank in range(2)]
    for rank_calls in calls:
        assert [c["call"] for c in rank_calls] == ["save", "load"]
    for i, call in enumerate(("save", "load")):
        tensors = [rank_calls[i]["tensors"] for rank_calls in calls]
        assert tensors[0].keys() == tensors[1].keys()
        matrices = [k for k, (_, _, whole) in tensors[0].items() if whole > 1]  # AdamW's step counts are scalars
        assert any(k.startswith("model.") for k in matrices) and any(k.startswith("optimizer.") for k in matrices)
        for key in matrices:
            assert all(t[key][0] for t in tensors), f"{call}: {key} is not a DTensor"
            assert tensors[0][key][1] + tensors[1][key][1] == tensors[0][key][2], (call, key, tensors[0][key], tensors[1][key])
        for t in tensors:
            held, whole = sum(t[k][1] for k in matrices), sum(t[k][2] for k in matrices)
            assert 0.4 * whole < held < 0.6 * whole, (call, held, whole)


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(small_disk):
    model, optimizer = trained_tiny()
    path = os.path.join(small_disk, "ckpt.dcp")
    values = dict(model_args=model.config.to_dict(), iter_num=1)
    ShardedCheckpointer().save(path, model, optimizer, values)
    kept = sorted(os.listdir(path))
    fill(small_disk, leave=16 * 1024)  # less than a checkpoint of this model
    with pytest.raises(UserError, match="No space left on device.*needs about") as error:
        ShardedCheckpointer().save(path, model, optimizer, dict(values, iter_num=2))
    assert "ckpt.dcp" in str(error.value)
    assert sorted(os.listdir(path)) == kept  # the half-written step folder is gone
    assert load_checkpoint(path)["iter_num"] == 1
