"""train.py and sample.py end to end, as subprocesses on CPU: metrics, checkpoints, reproducibility,
user errors, and sampling from our checkpoints and from a (tiny, random) Hugging Face GPT-2 directory."""

import os
import json
import math

import pytest
import torch

from conftest import assert_user_error, read_metrics, run_script, script_env

SEPARATOR = "---------------"
# a small character model that still learns quickly on 2 CPU cores
TINY = ["train.py", "config/train_shakespeare_char_cpu.py", "--n_layer=2", "--n_head=4", "--n_embd=64",
        "--batch_size=16", "--device=cpu", "--dtype=float32", "--compile=False"]


def train(data_root, out_dir, *args, check=True, timeout=300):
    return run_script(*TINY, f"--data_root={data_root}", f"--out_dir={out_dir}", *args, check=check, timeout=timeout)


def sample(*args, check=True, env=None, timeout=300):
    return run_script("sample.py", "--device=cpu", *args, check=check, env=env, timeout=timeout)


def step_losses(records):
    return [(r["iter"], r["loss"]) for r in records if "loss" in r]


def split_samples(stdout, prompt, n_new, num_samples):
    """The samples printed with --stream=False: prompt + n_new characters, a newline, the separator line."""
    samples, pos = [], 0
    for _ in range(num_samples):
        text = stdout[pos:pos + len(prompt) + n_new]
        assert text.startswith(prompt), repr(stdout)
        samples.append(text[len(prompt):])
        pos += len(prompt) + n_new
        assert stdout[pos:pos + len(SEPARATOR) + 2] == f"\n{SEPARATOR}\n", repr(stdout)
        pos += len(SEPARATOR) + 2
    assert pos == len(stdout), repr(stdout)
    return samples


# -----------------------------------------------------------------------------
# the done-when test: train a character model on CPU, then sample from it

@pytest.mark.slow
def test_train_shakespeare_char_then_sample(data_root, tmp_path):
    out_dir = tmp_path / "out"
    train(data_root, out_dir, "--max_iters=500", "--lr_decay_iters=500", "--warmup_iters=20", "--learning_rate=3e-3",
          "--eval_interval=100", "--eval_iters=10", "--log_interval=50")

    evals = [r for r in read_metrics(out_dir) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 100, 200, 300, 400, 500]
    assert abs(evals[0]["val_loss"] - math.log(65)) < 0.3  # an untrained model is near uniform over 65 characters
    assert evals[-1]["val_loss"] < 2.5, evals  # it learned (ln 65 = 4.17)
    assert evals[-1]["val_loss"] < evals[1]["val_loss"]

    checkpoint = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == 500
    assert checkpoint["model_args"]["vocab_size"] == 65 and checkpoint["model_args"]["n_layer"] == 2
    assert checkpoint["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in evals))
    assert "transformer.wte.weight" in checkpoint["model"] and checkpoint["optimizer"]["state"]

    with open(os.path.join(data_root, "shakespeare_char", "meta.json")) as f:
        vocabulary = set(json.load(f)["stoi"])
    result = sample("--init_from=resume", f"--out_dir={out_dir}", "--num_samples=2", "--max_new_tokens=50", "--stream=False")
    samples = split_samples(result.stdout, "\n", 50, 2)  # the default prompt is a newline
    for text in samples:
        assert len(text) == 50 and set(text) <= vocabulary
    assert samples[0] != samples[1]  # sampled, not greedy
    assert "100 tokens" in result.stderr  # 2 x 50 reported


# -----------------------------------------------------------------------------
# a short run shared by the tests below

SHORT = ["--max_iters=20", "--eval_interval=10", "--eval_iters=2", "--log_interval=1", "--learning_rate=1e-3", "--warmup_iters=100"]


@pytest.fixture(scope="module")
def short_run(data_root, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("short") / "out"
    train(data_root, out_dir, *SHORT)
    return out_dir


def test_metrics_jsonl(short_run):
    records = read_metrics(short_run)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in steps] == list(range(20))
    assert [r["iter"] for r in evals] == [0, 10, 20]
    for r in steps:
        assert {"iter", "loss", "lr", "tokens_per_sec"} <= set(r)
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 10 and r["tokens_per_sec"] > 0
        # linear warmup: learning_rate 1e-3 over warmup_iters 100
        assert r["lr"] == pytest.approx(1e-3 * (r["iter"] + 1) / 101)
    for r in evals:
        assert {"iter", "train_loss", "val_loss"} <= set(r)
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"])
    # every line is one JSON object (read_metrics parsed them all), each tied to a step
    assert all(isinstance(r.get("iter"), int) for r in records)


def test_checkpoint_loads_with_weights_only(short_run):
    checkpoint = torch.load(short_run / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] in (10, 20)
    assert checkpoint["config"]["max_iters"] == 20 and checkpoint["config"]["dataset"] == "shakespeare_char"
    assert not os.path.exists(short_run / "ckpt.pt.tmp")


def test_reproducible_and_seeded(data_root, short_run, tmp_path):
    expected = step_losses(read_metrics(short_run))
    train(data_root, tmp_path / "again", *SHORT)
    assert step_losses(read_metrics(tmp_path / "again")) == expected  # bit for bit
    train(data_root, tmp_path / "seeded", *SHORT, "--seed=7")
    other = step_losses(read_metrics(tmp_path / "seeded"))
    assert [i for i, _ in other] == [i for i, _ in expected]
    assert all(a != b for (_, a), (_, b) in zip(other, expected))


def test_missing_dataset_bins(tmp_path):
    empty_root = tmp_path / "data"
    empty_root.mkdir()
    result = train(empty_root, tmp_path / "out", "--max_iters=5", check=False)
    assert_user_error(result, "data/shakespeare_char/prepare.py")
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# sample.py on our checkpoint

def test_stream_prints_what_batch_prints(short_run):
    common = ["--init_from=resume", f"--out_dir={short_run}", "--temperature=0", "--num_samples=2",
              "--max_new_tokens=80", "--start=ROMEO:"]  # 6 + 80 characters: past block_size 64
    batch = sample(*common, "--stream=False").stdout
    streamed = sample(*common, "--stream=True").stdout
    assert streamed == batch
    samples = split_samples(batch, "ROMEO:", 80, 2)
    assert samples[0] == samples[1]  # greedy: the same both times


@pytest.mark.parametrize("start, needle", [("", "empty"), ("ROMEO: ½", "vocabulary")])
def test_sample_prompt_outside_char_vocabulary(short_run, start, needle):
    result = sample("--init_from=resume", f"--out_dir={short_run}", f"--start={start}", "--max_new_tokens=2", check=False)
    assert_user_error(result, needle)


def test_sample_resume_without_checkpoint(tmp_path):
    assert_user_error(sample("--init_from=resume", f"--out_dir={tmp_path}", check=False), "ckpt.pt")


# -----------------------------------------------------------------------------
# sample.py on a Hugging Face GPT-2 directory (tiny and random: nothing is downloaded)

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_layer=2, n_head=2, n_embd=32))
    path = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(path)
    return str(path)


def test_sample_hf_directory(hf_dir):
    import tiktoken
    result = sample(f"--init_from={hf_dir}", "--start=Hello", "--max_new_tokens=10", "--num_samples=1", "--stream=False")
    assert result.stdout.startswith("Hello")
    text, rest = result.stdout.rsplit(f"\n{SEPARATOR}\n", 1)
    assert rest == ""
    assert len(tiktoken.get_encoding("gpt2").encode(text, allowed_special="all")) > 1
    assert "10 tokens" in result.stderr


def test_sample_gpt2_offline(tmp_path):
    # an empty hub cache and offline mode: as on a machine that never downloaded GPT-2 and has no network
    env = script_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = sample("--init_from=gpt2", "--max_new_tokens=2", check=False, env=env)
    line = assert_user_error(result, "gpt2")
    assert "directory" in line
