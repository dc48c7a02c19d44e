"""
HellaSwag inside train.py (--hellaswag_interval): evaluated every K steps and at the end, logged to metrics.jsonl,
equal to eval_hellaswag.py on the checkpoint, and the same on 1 and 2 processes (examples shared out, counts summed).
"""

import os
import sys
import json
import subprocess

import pytest

from conftest import REPO, TINY_TRAIN_ARGS, assert_user_error, read_metrics, run_script, script_env
from test_hellaswag import EXAMPLES, write_jsonl

# a BPE model (HellaSwag is English text in GPT-2 tokens); bias=False keeps 1 and 2 processes within roundoff
ARGS = [*TINY_TRAIN_ARGS, "--dataset=shakespeare", "--bias=False", "--max_iters=4", "--eval_interval=2",
        "--hellaswag_interval=2", "--gradient_accumulation_steps=2"]


def hellaswag_records(out_dir):
    return {r["iter"]: r for r in read_metrics(out_dir) if "hellaswag_acc" in r}


@pytest.fixture(scope="module")
def examples_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("hs") / "hellaswag_val.jsonl", EXAMPLES)


# train.py run with every result of evaluate_hellaswag (per-example losses and choices) appended to a file
RECORDING_TRAIN = """
import os, sys, json, runpy
sys.path.insert(0, os.getcwd())
import eval_hellaswag
real = eval_hellaswag.evaluate_hellaswag
def recording(*args, **kwargs):
    result = real(*args, **kwargs)
    with open(sys.argv.pop(1), "a") as f:
        f.write(json.dumps(result) + "\\n")
    return result
eval_hellaswag.evaluate_hellaswag = recording
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def one_process(data_root, examples_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    recorder = out / "recording_train.py"
    recorder.write_text(RECORDING_TRAIN.replace("sys.argv.pop(1)", repr(str(out / "hellaswag_results.jsonl"))))
    run_script(str(recorder), *ARGS[1:], f"--data_root={data_root}", f"--out_dir={out}", f"--hellaswag_path={examples_file}",
               check=True)
    return str(out)


def independent_scores(out_dir):
    """Each example scored ending by ending from the run's checkpoint, written here: the model's forward on
    context + " " + ending alone (no batch, no padding), the log-probabilities of the ending's tokens summed."""
    import tiktoken
    import torch
    from common import load_model
    model = load_model("resume", out_dir, overrides=dict(dropout=0.0)).model.eval()
    enc = tiktoken.get_encoding("gpt2")
    scores = []
    for example in EXAMPLES:
        ctx, sums, counts = enc.encode(example["ctx"]), [], []
        for ending in example["endings"]:
            end = enc.encode(" " + ending)
            seq = (ctx + end)[-(model.config.block_size + 1):]
            with torch.no_grad():
                logits, _ = model(torch.tensor([seq[:-1]]))
            logp = torch.log_softmax(logits[0].double(), dim=-1)
            first = len(seq) - len(end)
            sums.append(-sum(logp[first + k - 1, end[k]].item() for k in range(len(end))))
            counts.append(len(end))
        scores.append((sums, counts))
    return scores


def test_hellaswag_every_k_steps_and_at_the_end_equals_the_script(one_process, examples_file):
    records = hellaswag_records(one_process)
    assert sorted(records) == [0, 2, 4]
    assert all(r["hellaswag_n"] == len(EXAMPLES) and 0 <= r["hellaswag_acc"] <= 1 for r in records.values())
    with open(os.path.join(one_process, "hellaswag_results.jsonl")) as f:
        during_training = [json.loads(line) for line in f]
    assert len(during_training) == 3
    final = during_training[-1]  # step 4, the weights of the checkpoint the run ends with
    assert (final["acc"], final["acc_norm"]) == (records[4]["hellaswag_acc"], records[4]["hellaswag_acc_norm"])
    reference = independent_scores(one_process)
    for i, (sums, counts) in enumerate(reference):
        assert final["n_tokens"][i] == counts
        assert final["sum_loss"][i] == pytest.approx(sums, rel=1e-4, abs=1e-4), i
        assert final["pred"][i] == min(range(4), key=lambda j: sums[j])
        assert final["pred_norm"][i] == min(range(4), key=lambda j: sums[j] / counts[j])
    # the script on the checkpoint: the same per-example scores and choices
    predictions = os.path.join(one_process, "predictions.jsonl")
    script = run_script("eval_hellaswag.py", "--init_from=resume", "--checkpoint=last", f"--out_dir={one_process}",
                        f"--data_path={examples_file}",
                        "--device=cpu", f"--predictions_path={predictions}", check=True)
    with open(predictions) as f:
        by_script = [json.loads(line) for line in f]
    for i, p in enumerate(by_script):
        assert (p["pred"], p["pred_norm"]) == (final["pred"][i], final["pred_norm"][i])
        assert p["sum_loss"] == pytest.approx(final["sum_loss"][i], rel=1e-4, abs=1e-4)
    line = script.stdout.strip().splitlines()[-1]
    assert line == f"hellaswag: {len(EXAMPLES)} examples, acc {final['acc']:.4f}, acc_norm {final['acc_norm']:.4f}"


@pytest.mark.slow  # torchrun (~20 s)
def test_two_processes_log_the_same_hellaswag(data_root, examples_file, one_process, tmp_path):
    out = str(tmp_path / "two")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *ARGS,
                             f"--data_root={data_root}", f"--out_dir={out}", f"--hellaswag_path={examples_file}"],
                            cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert hellaswag_records(out).keys() == hellaswag_records(one_process).keys()
    for step, record in hellaswag_records(out).items():
        reference = hellaswag_records(one_process)[step]
        for key in ("hellaswag_n", "hellaswag_acc", "hellaswag_acc_norm"):
            assert record[key] == reference[key], (step, key)


def test_hellaswag_on_a_character_model_is_refused(data_root, examples_file, tmp_path):
    result = run_script(*TINY_TRAIN_ARGS, f"--data_root={data_root}", f"--out_dir={tmp_path / 'out'}",
                        "--hellaswag_interval=2", f"--hellaswag_path={examples_file}")
    assert_user_error(result, "character-level", "hellaswag_interval=0")
    assert not (tmp_path / "out").exists()


def test_hellaswag_without_the_file_is_refused(data_root, tmp_path):
    result = run_script(*ARGS, f"--data_root={data_root}", f"--out_dir={tmp_path / 'out'}",
                        f"--hellaswag_path={tmp_path / 'missing.jsonl'}")
    assert_user_error(result, "missing.jsonl", "data/hellaswag/prepare.py")
    assert not (tmp_path / "out").exists()
