"""
bench.py on tiny shapes: each mode runs and reports the fields it promises, with values that agree with
independent arithmetic (bytes of a KV cache, tokens per second from ms per step), and every bad setting
ends with one line naming the key. Timings are never asserted.
"""

import sys
import json
import importlib
from dataclasses import fields

import pytest

from helpers import run_script
from model import GPTConfig

TINY_ARGS = ["--n_layer=2", "--n_head=4", "--n_embd=32", "--block_size=32", "--vocab_size=64", "--device=cpu"]


def bench(tmp_path, *args):
    out = tmp_path / "bench.jsonl"
    result = run_script("bench.py", *TINY_ARGS, *args, f"--json_out={out}", timeout=300)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 1
    return records[0], result.stdout


def test_train_mode_fields(tmp_path):
    record, stdout = bench(tmp_path, "--batch_size=2", "--steps=2", "--warmup_steps=1")
    r = record["result"]
    assert record["mode"] == "train" and record["dtype"] == "float32" and record["device"].startswith("cpu")
    assert r["params"] > 0 and r["ms_per_iter"] > 0 and r["mfu"] is None  # no known peak for a CPU
    assert r["tokens_per_sec"] == pytest.approx(2 * 32 / (r["ms_per_iter"] / 1000), rel=1e-6)
    head_dim = 32 // 4
    assert r["kv_bytes_per_token"] == 2 * 2 * 4 * head_dim * 4  # keys and values, 2 layers, 4 heads, fp32
    assert r["peak_mem_mib"] > 0
    for key in ("params", "ms_per_iter", "tokens_per_sec", "kv_bytes_per_token"):
        assert key in stdout


def test_every_gptconfig_field_is_a_setting(tmp_path):
    """Every GPTConfig field is a bench.py setting (its config block and MODEL_SETTINGS list them all) and reaches the model."""
    record, _ = bench(tmp_path, "--batch_size=1", "--steps=1", "--warmup_steps=0", "--rope=True", "--rope_theta=500.0",
                      "--dropout=0.1", "--n_kv_head=2", "--window=8")
    settings = record["settings"]
    for f in fields(GPTConfig):
        assert f.name in settings, f.name
    assert settings["rope_theta"] == 500.0 and settings["dropout"] == 0.1
    head_dim = 32 // 4
    assert record["result"]["kv_bytes_per_token"] == 2 * 2 * 2 * head_dim * 4  # n_kv_head=2 halves it
    # rope drops the learned position table: 32 positions x 32 wide fewer parameters than with it
    (tmp_path / "plain").mkdir()
    plain, _ = bench(tmp_path / "plain", "--batch_size=1", "--steps=1", "--warmup_steps=0", "--n_kv_head=2")
    assert plain["result"]["params"] - record["result"]["params"] == 32 * 32


def test_attention_mode_rows(tmp_path):
    record, stdout = bench(tmp_path, "--mode=attention", "--seq_lens=(32,64)", "--bench_window=8", "--attn_repeats=1")
    rows = record["result"]
    assert [(r["T"], r["impl"]) for r in rows] == [(T, impl) for T in (32, 64) for impl in ("full", "window-dense", "window-blocked")]
    assert all(r["ms_fwd_bwd"] > 0 for r in rows)
    assert [r["window"] for r in rows[:3]] == [None, 8, 8]
    assert stdout.count("T=") == 6


def test_attention_mode_skips_dense_past_limit(tmp_path):
    record, stdout = bench(tmp_path, "--mode=attention", "--seq_lens=(32,64)", "--bench_window=8", "--attn_repeats=1",
                           "--dense_max_T=32")
    assert [(r["T"], r["impl"]) for r in record["result"]] == [
        (32, "full"), (32, "window-dense"), (32, "window-blocked"), (64, "full"), (64, "window-blocked")]
    assert "skipped" in stdout


@pytest.mark.parametrize("extra, held", [([], 24), (["--window=8"], 8)])
def test_generate_mode_fields(tmp_path, extra, held):
    record, _ = bench(tmp_path, "--mode=generate", "--prompt_len=4", "--new_tokens=20", "--gen_batch_size=2",
                      "--memory_at=(5,10)", *extra)
    r = record["result"]
    assert r["batch_size"] == 2 and r["new_tokens"] == 20 and r["use_cache"] is True
    assert r["tokens_per_sec"] == pytest.approx(2 * 20 / r["seconds"], rel=1e-6)
    assert sorted(int(k) for k in r["peak_mem_mib_at"]) == [5, 10]
    # 2 layers x (keys + values) x batch 2 x 4 heads x 8 dims x fp32, for 4 + 20 positions (or the window)
    assert r["kv_cache_bytes"] == 2 * 2 * 2 * 4 * 8 * 4 * held


def test_generate_mode_without_cache(tmp_path):
    record, _ = bench(tmp_path, "--mode=generate", "--prompt_len=4", "--new_tokens=5", "--use_cache=False")
    assert record["result"]["use_cache"] is False and "kv_cache_bytes" not in record["result"]


def recorded_vs_transformers(monkeypatch, tmp_path, *args):
    """bench.py --mode=generate --vs_transformers=True in-process, with transformers' GPT-2 given varied random
    weights (its own init makes greedy decoding repeat one token, which a broken cache would still match), and
    every generate() output of both models recorded. Returns (bench's result, our outputs, transformers'
    outputs, the transformers model)."""
    import torch
    import bench
    from transformers import GPT2LMHeadModel
    from model import GPT
    hf_models, hf_outputs, our_outputs = [], [], []
    real_save, real_hf_generate = GPT2LMHeadModel.save_pretrained, GPT2LMHeadModel.generate

    def vary_then_save(self, *a, **k):  # bench saves its transformers model for ours to load: vary the weights first
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in self.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1.0 + 0.1 * noise if "ln_" in name and name.endswith("weight") else 0.2 * noise)
        hf_models.append(self)
        return real_save(self, *a, **k)

    def recording_hf_generate(self, *a, **k):
        out = real_hf_generate(self, *a, **k)
        hf_outputs.append(out.clone())
        return out

    real_generate = GPT.generate

    def recording_generate(self, *a, **k):
        out = real_generate(self, *a, **k)
        our_outputs.append(out.clone())
        return out

    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", vary_then_save)
    monkeypatch.setattr(GPT2LMHeadModel, "generate", recording_hf_generate)
    monkeypatch.setattr(GPT, "generate", recording_generate)
    importlib.reload(bench)
    out = tmp_path / "bench.jsonl"
    monkeypatch.setattr(sys, "argv", ["bench.py", *TINY_ARGS, "--mode=generate", "--vs_transformers=True", f"--json_out={out}", *args])
    bench.main()
    return json.loads(out.read_text())["result"], our_outputs, hf_outputs, hf_models[-1]


@pytest.mark.parametrize("batch", [1, 3])
def test_generate_vs_transformers(tmp_path, monkeypatch, batch):
    """The same varied random GPT-2 in transformers and here: the greedy tokens are identical, and equal to a
    reference written here (transformers' forward over the whole sequence, argmax, one token at a time)."""
    import torch
    r, ours, theirs, hf = recorded_vs_transformers(monkeypatch, tmp_path, "--prompt_len=5", "--new_tokens=24",
                                                   f"--gen_batch_size={batch}", "--gen_repeats=2")
    assert len(ours) == len(theirs) == 3  # a warm-up and two timed runs each
    ids = ours[-1][:, :5]
    with torch.no_grad():
        for _ in range(24):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours[-1], ids) and torch.equal(theirs[-1], ids)
    assert all(len(set(row[5:].tolist())) >= 4 for row in ids)  # varied tokens: a stuck cache would show
    assert r["tokens_identical"] is True and r["identical_new_tokens"] == 24
    assert r["batch_size"] == batch and r["weights_dtype"] == "float32" and r["repeats"] == 2
    assert r["tokens_per_sec"] > 0 and r["transformers_tokens_per_sec"] > 0
    assert r["speedup_vs_transformers"] == pytest.approx(r["tokens_per_sec"] / r["transformers_tokens_per_sec"])


def test_generate_vs_transformers_bf16_reports_agreement(tmp_path, monkeypatch):
    """In bf16 the reported agreement is the length of the common prefix of the two outputs, counted here."""
    r, ours, theirs, _ = recorded_vs_transformers(monkeypatch, tmp_path, "--prompt_len=5", "--new_tokens=16", "--dtype=bfloat16",
                                                  "--gen_batch_size=3")
    new_ours, new_theirs = ours[-1][:, 5:], theirs[-1][:, 5:]
    prefix = next((i for i in range(16) if not bool((new_ours[:, i] == new_theirs[:, i]).all())), 16)
    assert r["weights_dtype"] == "bfloat16" and r["identical_new_tokens"] == prefix
    assert r["tokens_identical"] == (prefix == 16)
    assert prefix >= 1  # the same weights agree at least on the first token


BAD = [
    (["--mode=fast"], "mode"),
    (["--n_layer=0"], "n_layer"),
    (["--dropout=1.0"], "dropout"),
    (["--window=0"], "window"),
    (["--n_kv_head=3"], "n_kv_head"),
    (["--rope_theta=0.0", "--rope=True"], "rope_theta"),
    (["--attn_impl=fastest"], "attn_impl"),
    (["--batch_size=0"], "batch_size"),
    (["--steps=0"], "steps"),
    (["--warmup_steps=-1"], "warmup_steps"),
    (["--seq_len=33"], "seq_len"),
    (["--seq_len=-1"], "seq_len"),
    (["--seq_lens=()"], "seq_lens"),
    (["--seq_lens=(0,)"], "seq_lens"),
    (["--bench_window=0"], "bench_window"),
    (["--impls=('sparse',)"], "impls"),
    (["--mode=attention", "--impls=('window-flex',)"], "impls"),
    (["--attn_repeats=0"], "attn_repeats"),
    (["--dense_max_T=0"], "dense_max_T"),
    (["--gen_batch_size=0"], "gen_batch_size"),
    (["--prompt_len=0"], "prompt_len"),
    (["--new_tokens=0"], "new_tokens"),
    (["--gen_repeats=0"], "gen_repeats"),
    (["--memory_at=(0,)"], "memory_at"),
    (["--new_tokens=10", "--memory_at=(11,)"], "memory_at"),
    (["--beyond_block_size=True"], "beyond_block_size"),
    (["--mode=generate", "--vs_transformers=True", "--rope=True"], "vs_transformers"),
    (["--mode=generate", "--vs_transformers=True", "--n_kv_head=2"], "vs_transformers"),
    (["--mode=generate", "--vs_transformers=True", "--use_cache=False"], "vs_transformers"),
    (["--vs_transformers=True"], "vs_transformers"),  # train mode
    (["--dtype=float64"], "dtype"),
    (["--device=tpu"], "device"),
]


def run_bench_in_process(monkeypatch, capsys, args):
    """bench.main() as the command line runs it (a fresh module: settings are its globals); returns (exit code, stderr)."""
    import bench
    importlib.reload(bench)
    monkeypatch.setattr(sys, "argv", ["bench.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        bench.run_main(bench.main)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, key", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_setting_is_one_line_naming_it(tmp_path, monkeypatch, capsys, args, key):
    """Checked before any work (in-process: each error comes before a model is built)."""
    out = tmp_path / "bench.jsonl"
    code, stderr = run_bench_in_process(monkeypatch, capsys, [*TINY_ARGS, *args, f"--json_out={out}"])
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], stderr
    assert not out.exists()


def test_bad_setting_from_the_command_line(tmp_path):
    out = tmp_path / "bench.jsonl"
    result = run_script("bench.py", *TINY_ARGS, "--mode=generate", "--new_tokens=0", f"--json_out={out}", timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: --new_tokens=0 is out of range: new_tokens must be an integer >= 1"]
    assert not out.exists()


def test_json_out_in_missing_folder(monkeypatch, capsys, tmp_path):
    code, stderr = run_bench_in_process(monkeypatch, capsys, [*TINY_ARGS, f"--json_out={tmp_path / 'missing' / 'b.jsonl'}"])
    assert code == 1 and "json_out" in stderr
