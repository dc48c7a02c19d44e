"""
HellaSwag: eval_hellaswag.py against a reference written here with transformers' GPT-2 (a random tiny
model saved locally, scored ending by ending, no batching), the same result on 1 and 2 processes,
malformed files as one-line errors, and data/hellaswag/prepare.py up to the network.
"""

import os
import sys
import json
import math
import runpy
import subprocess
import importlib.util

import pytest
import torch

from helpers import EXAMPLES, REPO, run_script, script_env, assert_user_error, tiny_model, write_jsonl
from common import UserError, get_tokenizer
from checkpoint import save_checkpoint
from hf_bridge import gpt_from_hf

transformers = pytest.importorskip("transformers")
tiktoken = pytest.importorskip("tiktoken")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import eval_hellaswag  # noqa: E402

N_POSITIONS = 32  # small, so that the long context below is cut to fit

# the original release's format: every field, as in hellaswag_val.jsonl
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random GPT-2 in the Hugging Face format (folder) and a train.py checkpoint of the same weights."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=N_POSITIONS, n_embd=32, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    hf = GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random everywhere (HF's init leaves biases 0 and gains 1, which would hide a mix-up)
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if ".ln_" in name and name.endswith("weight") else (0.1 if p.dim() >= 2 else 0.05) * noise)
    root = tmp_path_factory.mktemp("hellaswag")
    folder = root / "tiny_gpt2"
    hf.save_pretrained(folder)
    out_dir = root / "out"
    out_dir.mkdir()
    model = gpt_from_hf(str(folder))
    save_checkpoint(dict(model=model.state_dict(), model_args=model.config.to_dict(), iter_num=1234), str(out_dir / "ckpt.pt"))
    data = write_jsonl(root / "hellaswag_val.jsonl", EXAMPLES)
    return dict(hf=hf, folder=str(folder), out_dir=str(out_dir), data=data, root=root)


def reference(hf, examples):
    """Scores written independently of eval_hellaswag.py: transformers' GPT-2, one ending at a time,
    log-probabilities of the ending's tokens in float64; the model sees at most n_positions tokens, the
    context losing its first ones."""
    enc = tiktoken.get_encoding("gpt2")
    results = []
    for example in examples:
        ctx = enc.encode(example["ctx"])
        sums, counts = [], []
        for ending in example["endings"]:
            end = enc.encode(" " + ending)
            seq = (ctx + end)[-(N_POSITIONS + 1):]
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([seq[:-1]])).logits[0].double(), dim=-1)
            first = len(seq) - len(end)  # where the ending starts in seq; position p is predicted at p - 1
            sums.append(-sum(logp[first + k - 1, end[k]].item() for k in range(len(end))))
            counts.append(len(end))
        pred = min(range(4), key=lambda j: sums[j])
        pred_norm = min(range(4), key=lambda j: sums[j] / counts[j])
        results.append(dict(sum_loss=sums, n_tokens=counts, pred=pred, pred_norm=pred_norm, label=example["label"]))
    return results


def accuracy(results, key):
    return sum(r[key] == r["label"] for r in results) / len(results)


def read_predictions(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_eval(*args):
    return run_script("eval_hellaswag.py", "--device=cpu", *args, timeout=300)


def summary_line(acc, acc_norm, n):
    return f"hellaswag: {n} examples, acc {acc:.4f}, acc_norm {acc_norm:.4f}"


@pytest.fixture(scope="module")
def single_run(tiny):
    predictions = tiny["root"] / "single.jsonl"
    result = run_eval(f"--init_from={tiny['folder']}", f"--data_path={tiny['data']}", f"--predictions_path={predictions}")
    assert result.returncode == 0, result.stderr
    return result, read_predictions(predictions)


# -----------------------------------------------------------------------------
# scores against the reference

def test_scoring_pinned_by_hand():
    """The published scoring (build-nanogpt's hellaswag.py, llm.c's dev/data/hellaswag.py: completion style,
    context + " " + ending, cross-entropy over the ending's tokens only, acc = lowest summed loss, acc_norm =
    lowest mean loss), which gives OpenAI's GPT-2 124M acc 0.2859 and acc_norm 0.2955 on the 10,042 validation
    examples (build-nanogpt's figures), checked on numbers worked out by hand rather than by a second
    implementation. The model is a unigram: every position predicts token t with probability 2**-(t+1) for
    the digits 0-6 and 2**-7 for the space, so a token costs (t+1)*ln 2 (a space 7*ln 2) whatever came before.
    Ending A is " 0000000000": 7 + 10 = 17 (11 tokens, mean 1.55); B " 2": 7 + 3 = 10 (2, mean 5);
    C " 33": 7 + 4 + 4 = 15 (3, mean 5); D " 1111": 7 + 4 * 2 = 15 (5, mean 3), in units of ln 2. So the
    summed loss picks B and the mean picks A; the context's own tokens ("6666") never count."""
    vocab = "0123456" + " "
    log_p = torch.log(torch.tensor([2.0 ** -(t + 1) for t in range(7)] + [2.0 ** -7]))
    assert math.isclose(log_p.exp().sum().item(), 1.0, rel_tol=1e-6)

    class Unigram(torch.nn.Module):
        config = type("Config", (), {"block_size": 64})

        def forward(self, idx):
            return log_p.expand(*idx.shape, len(vocab)).clone(), None

    endings = ["0000000000", "2", "33", "1111"]
    examples = [dict(ctx="6666", endings=endings, label=1), dict(ctx="6666", endings=endings, label=0)]
    result = eval_hellaswag.evaluate_hellaswag(Unigram(), examples, "cpu", torch.autocast("cpu", enabled=False),
                                               lambda text: [vocab.index(c) for c in text])
    ln2 = math.log(2)
    for sums, counts in zip(result["sum_loss"], result["n_tokens"]):
        assert sums == pytest.approx([17 * ln2, 10 * ln2, 15 * ln2, 15 * ln2], rel=1e-5)
        assert counts == [11, 2, 3, 5]
    assert result["pred"] == [1, 1] and result["pred_norm"] == [0, 0]
    assert (result["acc"], result["acc_norm"]) == (0.5, 0.5)


def test_the_examples_exercise_truncation_and_differences(tiny):
    enc = tiktoken.get_encoding("gpt2")
    assert len(enc.encode(EXAMPLES[4]["ctx"])) > N_POSITIONS  # the long context really is cut
    ref = reference(tiny["hf"], EXAMPLES)
    for r in ref:  # the choices are clear-cut, so comparing them is meaningful at float32 precision
        for scores in (r["sum_loss"], [s / n for s, n in zip(r["sum_loss"], r["n_tokens"])]):
            ordered = sorted(scores)
            assert ordered[1] - ordered[0] > 1e-3, r


def test_script_matches_transformers_reference(tiny, single_run):
    result, predictions = single_run
    ref = reference(tiny["hf"], EXAMPLES)
    assert [p["pred"] for p in predictions] == [r["pred"] for r in ref]
    assert [p["pred_norm"] for p in predictions] == [r["pred_norm"] for r in ref]
    assert [p["label"] for p in predictions] == [e["label"] for e in EXAMPLES]
    for p, r in zip(predictions, ref):
        assert p["n_tokens"] == r["n_tokens"]
        for ours, theirs in zip(p["sum_loss"], r["sum_loss"]):
            assert abs(ours - theirs) < 1e-3 * max(1.0, abs(theirs)), (p, r)
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == summary_line(accuracy(ref, "pred"), accuracy(ref, "pred_norm"), len(EXAMPLES))


def test_evaluate_in_process_matches_reference(tiny):
    model = gpt_from_hf(tiny["folder"]).eval()
    encode = get_tokenizer(None)[0]
    result = eval_hellaswag.evaluate_hellaswag(model, EXAMPLES, "cpu", torch.autocast("cpu", enabled=False), encode)
    ref = reference(tiny["hf"], EXAMPLES)
    assert result["n"] == len(EXAMPLES)
    assert result["pred"] == [r["pred"] for r in ref] and result["pred_norm"] == [r["pred_norm"] for r in ref]
    assert result["acc"] == pytest.approx(accuracy(ref, "pred")) and result["acc_norm"] == pytest.approx(accuracy(ref, "pred_norm"))
    assert not model.training


def test_resume_appends_to_metrics(tiny, single_run):
    metrics = os.path.join(tiny["out_dir"], "metrics.jsonl")
    with open(metrics, "w") as f:
        f.write(json.dumps({"iter": 1234, "val_loss": 5.0}) + "\n")  # a run's own records stay
    result = run_eval("--init_from=resume", f"--out_dir={tiny['out_dir']}", f"--data_path={tiny['data']}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == single_run[0].stdout.strip().splitlines()[-1]
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    assert records[0] == {"iter": 1234, "val_loss": 5.0}
    ref = reference(tiny["hf"], EXAMPLES)
    assert records[1] == {"event": "hellaswag", "iter": 1234, "hellaswag_acc": pytest.approx(accuracy(ref, "pred")),
                          "hellaswag_acc_norm": pytest.approx(accuracy(ref, "pred_norm")), "hellaswag_n": len(EXAMPLES)}


def test_max_examples_takes_the_first(tiny):
    model = gpt_from_hf(tiny["folder"]).eval()
    encode = get_tokenizer(None)[0]
    full = eval_hellaswag.evaluate_hellaswag(model, EXAMPLES, "cpu", torch.autocast("cpu", enabled=False), encode)
    result = run_eval("--init_from=resume", f"--out_dir={tiny['out_dir']}", f"--data_path={tiny['data']}", "--max_examples=3")
    assert result.returncode == 0, result.stderr
    acc = sum(p == e["label"] for p, e in zip(full["pred"][:3], EXAMPLES[:3])) / 3
    acc_norm = sum(p == e["label"] for p, e in zip(full["pred_norm"][:3], EXAMPLES[:3])) / 3
    assert result.stdout.strip().splitlines()[-1] == summary_line(acc, acc_norm, 3)


# -----------------------------------------------------------------------------
# sharing out over processes

class CountingModel(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module  # found through .module, as under DDP
        self.forwards = 0

    def forward(self, idx):
        self.forwards += 1
        return self.module(idx)


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_ranks_share_the_examples_and_run_equal_forwards(tiny, monkeypatch, world_size):
    """Each rank's tables, as they go into the all-reduce, sum to the single-process tables; every rank runs
    ceil(n / world_size) forwards, a rank without an example left repeating one whose scores are dropped."""
    model = gpt_from_hf(tiny["folder"]).eval()
    encode = get_tokenizer(None)[0]
    ctx = torch.autocast("cpu", enabled=False)
    single = eval_hellaswag.evaluate_hellaswag(model, EXAMPLES, "cpu", ctx, encode)
    reduced = []
    monkeypatch.setattr(eval_hellaswag.dist, "all_reduce", lambda t: reduced.append(t.clone()))
    sum_loss, n_tokens = 0, 0
    for rank in range(world_size):
        counting = CountingModel(model)
        eval_hellaswag.evaluate_hellaswag(counting, EXAMPLES, "cpu", ctx, encode, rank=rank, world_size=world_size)
        assert counting.forwards == math.ceil(len(EXAMPLES) / world_size)
        rank_loss, rank_tokens = reduced[-2:]
        assert (rank_tokens.sum(dim=1) > 0).sum() == len(range(rank, len(EXAMPLES), world_size))  # its own rows only
        sum_loss, n_tokens = sum_loss + rank_loss, n_tokens + rank_tokens
    assert sum_loss.tolist() == single["sum_loss"] and n_tokens.tolist() == single["n_tokens"]


@pytest.mark.slow
def test_two_processes_give_the_same_result(tiny, single_run):
    """torchrun, 2 processes, 7 examples (one rank repeats an example): the same choices and losses as one
    process. The checkpoint holds the HF folder's weights (test_resume_appends_to_metrics: same result)."""
    predictions = tiny["root"] / "two.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "eval_hellaswag.py",
           "--device=cpu", "--init_from=resume", f"--out_dir={tiny['out_dir']}", f"--data_path={tiny['data']}",
           f"--predictions_path={predictions}"]
    result = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = [line for line in result.stdout.splitlines() if line.startswith("hellaswag:")]
    assert summary == [single_run[0].stdout.strip().splitlines()[-1]]  # printed once, by rank 0
    two = read_predictions(predictions)
    for a, b in zip(two, single_run[1], strict=True):
        assert a["pred"] == b["pred"] and a["pred_norm"] == b["pred_norm"] and a["n_tokens"] == b["n_tokens"]
        assert a["sum_loss"] == pytest.approx(b["sum_loss"], abs=1e-5)


# -----------------------------------------------------------------------------
# errors

VALID = json.dumps(EXAMPLES[0])
BAD_LINES = {
    "bad JSON": ('{"ctx": "A man", "endings": [', "not valid JSON"),
    "not an object": ('["ctx", "endings", "label"]', "not an object"),
    "missing label": (json.dumps({k: v for k, v in EXAMPLES[0].items() if k != "label"}), "no 'label'"),
    "missing ctx and endings": (json.dumps({"label": 0}), "no 'ctx', 'endings'"),
    "three endings": (json.dumps(dict(EXAMPLES[0], endings=["a", "b", "c"])), "list of 4 texts"),
    "an ending not text": (json.dumps(dict(EXAMPLES[0], endings=["a", "b", "c", 4])), "list of 4 texts"),
    "label 4": (json.dumps(dict(EXAMPLES[0], label=4)), "label' must be 0, 1, 2 or 3"),
    "label -1": (json.dumps(dict(EXAMPLES[0], label=-1)), "label' must be 0, 1, 2 or 3"),
    "label text": (json.dumps(dict(EXAMPLES[0], label="1")), "label' must be 0, 1, 2 or 3"),
    "label bool": (json.dumps(dict(EXAMPLES[0], label=True)), "label' must be 0, 1, 2 or 3"),
    "empty ctx": (json.dumps(dict(EXAMPLES[0], ctx="")), "'ctx' must be a non-empty text"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_malformed_line_names_its_line(tmp_path, case):
    line, message = BAD_LINES[case]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([VALID, VALID, line, VALID]) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        eval_hellaswag.load_hellaswag(str(path))
    text = str(info.value)
    assert f"{path}, line 3: " in text and message in text and "\n" not in text, text


def test_not_utf8_and_empty_files(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((VALID + "\n").encode() + b'{"ctx": "caf\xe9"}\n')
    with pytest.raises(UserError, match="line 2: not UTF-8"):
        eval_hellaswag.load_hellaswag(str(path))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no examples"):
        eval_hellaswag.load_hellaswag(str(tmp_path / "empty.jsonl"))
    with pytest.raises(UserError, match="python data/hellaswag/prepare.py"):
        eval_hellaswag.load_hellaswag(str(tmp_path / "missing.jsonl"))


def test_ending_longer_than_block_size(tiny):
    encode = get_tokenizer(None)[0]
    long_ending = dict(EXAMPLES[0], endings=["a"] * 3 + [" ".join(["word"] * 40)])
    with pytest.raises(UserError, match="ending 3 is 40 tokens, more than the model's block_size of 32"):
        eval_hellaswag.example_rows(long_ending, encode, N_POSITIONS, index=5)
    rows = eval_hellaswag.example_rows(dict(EXAMPLES[0], endings=["a"] * 3 + [" ".join(["word"] * 32)]), encode, N_POSITIONS)
    inputs, targets = rows[3]  # an ending of exactly block_size tokens: one context token left, all of it scored
    assert len(inputs) == N_POSITIONS and -1 not in targets


def test_script_malformed_file_is_one_line(tiny, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(VALID + "\n" + json.dumps(dict(EXAMPLES[0], label=7)) + "\n", encoding="utf-8")
    predictions = tmp_path / "predictions.jsonl"
    before = sorted(os.listdir(tiny["out_dir"])), metrics_text(tiny["out_dir"])
    line = assert_user_error(run_eval("--init_from=resume", f"--out_dir={tiny['out_dir']}", f"--data_path={path}",
                                   f"--predictions_path={predictions}"))
    assert "line 2" in line and "label" in line
    assert not predictions.exists() and (sorted(os.listdir(tiny["out_dir"])), metrics_text(tiny["out_dir"])) == before


def metrics_text(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    return open(path).read() if os.path.exists(path) else None


def test_script_refuses_character_models(tmp_path, tiny):
    chars = list("\n abcdefghijklmnopqrstuvwxyz")
    model = tiny_model(vocab_size=len(chars))
    save_checkpoint(dict(model=model.state_dict(), model_args=model.config.to_dict(), iter_num=10, chars=chars),
                    str(tmp_path / "ckpt.pt"))
    line = assert_user_error(run_eval("--init_from=resume", f"--out_dir={tmp_path}", f"--data_path={tiny['data']}"))
    assert "character-level" in line
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no metrics.jsonl written


@pytest.mark.parametrize("which", [None, "best", "last"])
def test_resume_scores_best_pt_unless_told(tmp_path, tiny, monkeypatch, capsys, which):
    """With no --checkpoint, --init_from=resume scores best.pt (the README's promise when the run has one), here
    the reference's weights; --checkpoint=last scores ckpt.pt (other weights, a later step). As the command line
    runs it, in a fresh namespace."""
    best = gpt_from_hf(tiny["folder"])
    last = gpt_from_hf(tiny["folder"])
    with torch.no_grad():
        for p in last.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save_checkpoint(dict(model=best.state_dict(), model_args=best.config.to_dict(), iter_num=40, val_loss=3.5),
                    str(tmp_path / "best.pt"))
    save_checkpoint(dict(model=last.state_dict(), model_args=last.config.to_dict(), iter_num=55, best_val_loss=3.5),
                    str(tmp_path / "ckpt.pt"))
    predictions = tmp_path / "predictions.jsonl"
    monkeypatch.setattr(sys, "argv", ["eval_hellaswag.py", "--device=cpu", f"--out_dir={tmp_path}", f"--data_path={tiny['data']}",
                                      f"--predictions_path={predictions}", *([f"--checkpoint={which}"] if which else [])])
    runpy.run_path(os.path.join(REPO, "eval_hellaswag.py"), run_name="__main__")
    said = capsys.readouterr().out
    step, name = (55, "ckpt.pt") if which == "last" else (40, "best.pt")
    assert f"read {tmp_path / name} (step {step}" in said, said
    assert json.loads(metrics_text(str(tmp_path)).splitlines()[-1])["iter"] == step
    scored = [p["sum_loss"] for p in read_predictions(predictions)]
    of_best = [r["sum_loss"] for r in reference(tiny["hf"], EXAMPLES)]
    close = all(abs(a - b) < 1e-3 * max(1.0, abs(b)) for ours, theirs in zip(scored, of_best) for a, b in zip(ours, theirs))
    assert close == (which != "last"), (scored, of_best)



# -----------------------------------------------------------------------------
# data/hellaswag/prepare.py up to the network

def load_prepare():
    spec = importlib.util.spec_from_file_location("hellaswag_prepare", os.path.join(REPO, "data", "hellaswag", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_uses_local_copy(tmp_path, monkeypatch, capsys):
    import requests
    def no_call(*args, **kwargs):
        raise AssertionError("downloaded although the file is there")
    monkeypatch.setattr(requests, "get", no_call)
    path = write_jsonl(tmp_path / "hellaswag_val.jsonl", EXAMPLES)
    before = open(path, "rb").read()
    load_prepare().main(str(tmp_path))
    assert open(path, "rb").read() == before
    assert f"{len(EXAMPLES)} examples" in capsys.readouterr().out


class FakeResponse:
    def __init__(self, blocks, fail_after=None):
        self.blocks, self.fail_after = blocks, fail_after

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self):
        pass

    def iter_content(self, chunk_size):
        import requests
        for i, block in enumerate(self.blocks):
            if i == self.fail_after:
                raise requests.ConnectionError("connection reset")
            yield block


def test_prepare_downloads_into_place(tmp_path, monkeypatch):
    import requests
    content = "".join(json.dumps(e) + "\n" for e in EXAMPLES).encode()
    asked = []
    def get(url, **kwargs):
        asked.append(url)
        return FakeResponse([content[:100], content[100:]])
    monkeypatch.setattr(requests, "get", get)
    prepare = load_prepare()
    prepare.main(str(tmp_path))
    assert asked == ["https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"]
    assert (tmp_path / "hellaswag_val.jsonl").read_bytes() == content
    assert len(eval_hellaswag.load_hellaswag(str(tmp_path / "hellaswag_val.jsonl"))) == len(EXAMPLES)


@pytest.mark.parametrize("fail_after", [None, 1])
def test_prepare_offline_leaves_nothing(tmp_path, monkeypatch, fail_after):
    import requests
    def get(url, **kwargs):
        if fail_after is None:
            raise requests.ConnectionError("no network in this test")
        return FakeResponse([b'{"ctx": "half', b' a line'], fail_after=fail_after)
    monkeypatch.setattr(requests, "get", get)
    with pytest.raises(SystemExit) as info:
        load_prepare().main(str(tmp_path))
    text = str(info.value.code)
    assert text.startswith("error: could not download HellaSwag") and "\n" not in text and str(tmp_path) in text
    assert os.listdir(tmp_path) == []  # no partial file
