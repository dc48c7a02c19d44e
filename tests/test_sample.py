"""sample.py as a subprocess: every setting checked before any work, and generation from a Hugging Face
GPT-2 folder against transformers' own greedy decoding, with and without the KV cache."""

import os
import sys
import runpy

import pytest
import torch

from common import UserError
from helpers import REPO, SEPARATOR, assert_user_error, sample, script_env, split_samples


# -----------------------------------------------------------------------------
# every setting against its range, before any work

# (argument, fragments of the one error line: the key and its range)
BAD_SETTINGS = [
    ("--num_samples=0", ["num_samples", ">= 1"]),
    ("--num_samples=-2", ["num_samples", ">= 1"]),
    ("--max_new_tokens=-1", ["max_new_tokens", "non-negative"]),
    ("--max_new_tokens=2.5", ["max_new_tokens", "int"]),
    ("--temperature=-0.5", ["temperature", ">= 0"]),
    ("--temperature=1e999", ["temperature", "finite"]),
    ("--top_k=0", ["top_k", ">= 1"]),
    ("--top_k=-3", ["top_k", ">= 1"]),
    ("--top_k=1.5", ["top_k", "int"]),
    ("--top_p=0", ["top_p", "(0, 1]"]),
    ("--top_p=1.5", ["top_p", "(0, 1]"]),
    ("--top_p=-0.1", ["top_p", "(0, 1]"]),
    ("--top_p=most", ["top_p", "(0, 1]"]),
    ("--top_p=True", ["top_p", "(0, 1]"]),
    ("--seed=-1", ["seed", "2**64"]),
    ("--seed=18446744073709551616", ["seed", "2**64"]),
    ("--seed=1.5", ["seed", "int"]),
    ("--device=tpu", ["device", "cuda:N"]),
    ("--device=cuda:first", ["device", "cuda:N"]),
    ("--dtype=float64", ["dtype", "bfloat16"]),
    ("--dtype=float16", ["float16", "CPU"]),  # sample() runs with --device=cpu
    ("--init_from=scratch", ["init_from=resume"]),
    ("--init_from=gpt3", ["init_from", "gpt2-medium", "folder"]),
    ("--init_from=no/such/folder", ["init_from", "no/such/folder"]),
    ("--start=FILE:no_such_prompt.txt", ["no_such_prompt.txt", "does not exist"]),
    ("--stream=yes", ["stream", "True, False or None"]),
    ("--stream=1", ["stream", "True, False or None"]),
    ("--use_cache=1", ["use_cache", "True or False"]),
    ("--num_sample=2", ["num_sample", "--num_samples"]),
]


def run_main_in_process(monkeypatch, *args):
    """sample.py's main() with these arguments, in a fresh copy of its namespace (no interpreter start-up)."""
    namespace = runpy.run_path(os.path.join(REPO, "sample.py"), run_name="sample_under_test")
    monkeypatch.setattr(sys, "argv", ["sample.py", "--device=cpu", *args])
    namespace["main"]()


@pytest.mark.parametrize("arg, fragments", BAD_SETTINGS, ids=[a for a, _ in BAD_SETTINGS])
def test_bad_setting_is_refused_before_any_work(monkeypatch, tmp_path, arg, fragments):
    # out_dir has no checkpoint: an error about anything but the setting would mean work began first
    with pytest.raises(UserError) as info:
        run_main_in_process(monkeypatch, f"--out_dir={tmp_path}", arg)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert list(tmp_path.iterdir()) == []


# one per place a setting is checked: the configurator's types, the sampling ranges, sample.py's own
# ranges, the device, the model source, the prompt file
@pytest.mark.parametrize("arg", ["--max_new_tokens=2.5", "--top_p=1.5", "--seed=-1", "--stream=yes", "--device=tpu",
                                 "--init_from=gpt3", "--start=FILE:no_such_prompt.txt"])
def test_bad_setting_is_one_line_on_stderr(tmp_path, arg):
    fragments = dict(BAD_SETTINGS)[arg]
    result = sample(f"--out_dir={tmp_path}", arg, check=False)
    assert_user_error(result, *fragments)
    assert result.stdout == ""


def test_prompt_file_that_is_not_utf8(monkeypatch, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_bytes(b"ROMEO\xff\xfe:")
    with pytest.raises(UserError, match="prompt.txt is not UTF-8"):
        run_main_in_process(monkeypatch, f"--out_dir={tmp_path}", f"--start=FILE:{path}")


# -----------------------------------------------------------------------------
# which checkpoint was read, and the validation loss that belongs to it

@pytest.mark.parametrize("which, said", [
    ("best", "best.pt (step 8, val loss 1.5000)"),  # best.pt's own loss
    ("last", "ckpt.pt (step 12, best val loss so far 1.5000)"),  # written at a stop: no loss of its own
    ("auto", "best.pt (step 8, val loss 1.5000)"),
])
def test_the_loss_said_is_the_one_of_the_file_read(monkeypatch, capsys, tmp_path, which, said):
    """A run stopped at step 12 after its best evaluation at step 8: ckpt.pt's step is not 8's, so its line must
    not give step 8's loss as its own."""
    from checkpoint import save_checkpoint
    from helpers import tiny_model
    chars = [chr(c) for c in range(32, 32 + 64)]
    model = tiny_model(vocab_size=64)
    weights = dict(model=model.state_dict(), model_args=model.config.to_dict(), chars=chars, config={})
    save_checkpoint(dict(weights, iter_num=8, val_loss=1.5), str(tmp_path / "best.pt"))
    save_checkpoint(dict(weights, iter_num=12, best_val_loss=1.5, evaluated=False), str(tmp_path / "ckpt.pt"))
    run_main_in_process(monkeypatch, f"--out_dir={tmp_path}", f"--checkpoint={which}", "--start=A", "--max_new_tokens=2",
                        "--num_samples=1", "--stream=False")
    stderr = capsys.readouterr().err
    assert f"; read {tmp_path / said}" in stderr, stderr


def test_a_checkpoint_before_any_evaluation_says_no_loss(monkeypatch, capsys, tmp_path):
    from checkpoint import save_checkpoint
    from helpers import tiny_model
    model = tiny_model(vocab_size=64)
    save_checkpoint(dict(model=model.state_dict(), model_args=model.config.to_dict(), chars=[chr(c) for c in range(32, 96)],
                         iter_num=3, best_val_loss=float("inf"), evaluated=False), str(tmp_path / "ckpt.pt"))
    run_main_in_process(monkeypatch, f"--out_dir={tmp_path}", "--start=A", "--max_new_tokens=2", "--num_samples=1", "--stream=False")
    stderr = capsys.readouterr().err
    assert stderr.rstrip().endswith(f"; read {tmp_path / 'ckpt.pt'} (step 3)"), stderr

# -----------------------------------------------------------------------------
# generation from a Hugging Face folder, against transformers

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random GPT-2 in the Hugging Face format (nothing downloaded), with weights large enough
    that greedy decoding walks through many different tokens: transformers' own init decodes one token
    over and over, which a cache that ignored every earlier position would reproduce just as well."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_layer=2, n_head=2, n_embd=32)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if ".ln_" in name and name.endswith("weight") else 0.3 * noise)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    hf.save_pretrained(path)
    return str(path), hf


def hf_greedy_ids(hf, ids, steps):
    """transformers' forward over the whole sequence at every step: the uncached reference."""
    idx = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            idx = torch.cat([idx, hf(idx).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(ids):].tolist()


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_sample_matches_transformers(hf_dir, tmp_path, use_cache):
    import tiktoken
    folder, hf = hf_dir
    enc = tiktoken.get_encoding("gpt2")
    prompt = "Once upon a time,\nthere was"
    path = tmp_path / "prompt.txt"
    path.write_text(prompt, encoding="utf-8")
    ids = enc.encode(prompt)
    new = hf_greedy_ids(hf, ids, 40)  # prompt + 40 tokens stay within the 64 positions
    assert len(set(new)) > 10, new  # a varied continuation: a cache that lost positions would show
    result = sample(f"--init_from={folder}", f"--start=FILE:{path}", "--max_new_tokens=40", "--num_samples=1",
                    "--temperature=0", "--stream=False", f"--use_cache={use_cache}")
    assert result.stdout == prompt + enc.decode(new) + f"\n{SEPARATOR}\n"
    assert "40 tokens" in result.stderr
    assert ("with KV cache" if use_cache else "without KV cache") in result.stderr


# -----------------------------------------------------------------------------
# sample.py on our checkpoint (conftest.short_run), and on folders and names

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



def test_sample_hf_directory(hf_dir):
    import tiktoken
    result = sample(f"--init_from={hf_dir[0]}", "--start=Hello", "--max_new_tokens=10", "--num_samples=1", "--stream=False")
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

