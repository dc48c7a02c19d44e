"""
HellaSwag inside train.py (--hellaswag_interval): evaluated every K steps and at the end, logged to metrics.jsonl,
equal to eval_hellaswag.py on the checkpoint, and the same on 1 and 2 processes (examples shared out, counts summed).
"""

import sys
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


@pytest.fixture(scope="module")
def one_process(data_root, examples_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one"))
    run_script(*ARGS, f"--data_root={data_root}", f"--out_dir={out}", f"--hellaswag_path={examples_file}", check=True)
    return out


def test_hellaswag_every_k_steps_and_at_the_end_equals_the_script(one_process, examples_file):
    records = hellaswag_records(one_process)
    assert sorted(records) == [0, 2, 4]
    assert all(r["hellaswag_n"] == len(EXAMPLES) and 0 <= r["hellaswag_acc"] <= 1 for r in records.values())
    script = run_script("eval_hellaswag.py", "--init_from=resume", "--checkpoint=last", f"--out_dir={one_process}",
                        f"--data_path={examples_file}",
                        "--device=cpu", check=True)
    line = script.stdout.strip().splitlines()[-1]
    final = records[4]
    assert line == f"hellaswag: {len(EXAMPLES)} examples, acc {final['hellaswag_acc']:.4f}, acc_norm {final['hellaswag_acc_norm']:.4f}"


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
