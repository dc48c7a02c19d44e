"""
Measures, never asserts timings. Three modes, all on synthetic data:

    python bench.py                         # training steps: tokens/s, ms/iter, MFU, peak memory
    python bench.py --mode=attention        # attention fwd+bwd time and memory against T: full vs windowed
    python bench.py --mode=generate         # generation tokens/s with and without the KV cache
    python bench.py --mode=generate --vs_transformers=True --gen_batch_size=8
                                            # the same random GPT-2 in transformers and here, side by side:
                                            # greedy tokens checked identical, tokens/s of each and the ratio

Model and run settings are --key=value as in train.py (configurator.py); every GPTConfig field is a
setting of the same name and default. Each setting is checked against its range before any work. Warm-up runs are
timed separately and left out. Peak memory is the CUDA allocator's peak on GPU, and the process's
peak resident set (VmHWM, reset before each measurement) on Linux CPUs.
"""

import os
import sys
import json
import time
import tempfile
import statistics

import torch

from model import GPTConfig
from errors import ConfigError
from attention import ATTENTION_IMPLS, causal_attention
from generation import KVCache
from configurator import read_settings
from common import UserError, run_main, range_check, pick_device, pick_dtype, autocast_context, estimate_mfu, new_model, load_pretrained

# -----------------------------------------------------------------------------
mode = "train"  # 'train' | 'attention' | 'generate'
# model: GPTConfig's fields (model.py) with its defaults: GPT-2 small, vocabulary padded to 50304
block_size = 1024
vocab_size = 50304
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True
rope = False
rope_theta = 10000.0
n_kv_head = None  # None: n_head
window = None  # None: full causal attention; W, or a tuple with one per layer
qk_norm = False
mlp_act = "gelu"  # 'gelu' | 'relu2'
attn_impl = "auto"  # 'auto' | 'dense' | 'blocked' | 'flex' for windowed layers
# train mode
batch_size = 8
seq_len = 0  # 0: block_size
warmup_steps = 3
steps = 10
grad_checkpoint = False
# attention mode: one layer's attention, n_head heads of n_embd // n_head, batch 1
seq_lens = (1024, 2048, 4096, 8192, 16384)
bench_window = 256
impls = ("full", "window-dense", "window-blocked")  # and 'window-flex'
attn_repeats = 3
dense_max_T = 16384  # skip the masked dense window (quadratic time) past this length
# generate mode (greedy)
gen_batch_size = 1
prompt_len = 16
new_tokens = 512
use_cache = True
beyond_block_size = False
memory_at = ()  # also report peak memory after these many tokens, e.g. (1024, 2048, 4096, 8192)
vs_transformers = False  # time transformers' GPT2LMHeadModel.generate on the same weights, alternating with ours
gen_repeats = 1  # timed generations (of each, alternating, with --vs_transformers); the median is reported
# system
device = "auto"
dtype = "auto"
compile = False
seed = 1337
json_out = ""  # also append the results as one JSON line to this file
# -----------------------------------------------------------------------------

# the settings above that are GPTConfig fields; tests/test_configurator.py checks that this is all of them
MODEL_SETTINGS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "rope", "rope_theta",
                  "n_kv_head", "window", "qk_norm", "mlp_act")
MODES = ("train", "attention", "generate")
# the kernels --mode=attention times: the window W of --bench_window through each kernel, or no window
ATTENTION_RUNS = {"full": (None, "dense"), "window-dense": ("window", "dense"), "window-blocked": ("window", "blocked"),
                  "window-flex": ("window", "flex")}


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(settings):
    """Every setting against its range, before any work: one line naming the key, exit 1."""
    need = range_check(vars(settings))
    need(settings.mode in MODES, "mode", "mode must be one of " + ", ".join(MODES))
    try:
        config = GPTConfig(**{key: getattr(settings, key) for key in MODEL_SETTINGS})
    except ConfigError as e:
        raise UserError(str(e)) from None
    need(settings.attn_impl in ATTENTION_IMPLS, "attn_impl", "attn_impl must be one of " + ", ".join(ATTENTION_IMPLS))
    for key in ("batch_size", "steps", "attn_repeats", "dense_max_T", "bench_window", "gen_batch_size", "prompt_len",
                "new_tokens", "gen_repeats"):
        need(is_int(getattr(settings, key)) and getattr(settings, key) >= 1, key, f"{key} must be an integer >= 1")
    need(is_int(settings.warmup_steps) and settings.warmup_steps >= 0, "warmup_steps", "warmup_steps must be an integer >= 0")
    need(is_int(settings.seq_len) and 0 <= settings.seq_len and (config.rope or settings.seq_len <= config.block_size), "seq_len",
         f"seq_len must be 0 (block_size) or at most block_size={config.block_size} (learned positions); any length with rope")
    need(len(settings.seq_lens) > 0 and all(is_int(T) and T >= 1 for T in settings.seq_lens), "seq_lens",
         "seq_lens must be a non-empty tuple of integers >= 1")
    need(len(settings.impls) > 0 and all(i in ATTENTION_RUNS for i in settings.impls), "impls",
         "impls must be a non-empty tuple of " + ", ".join(ATTENTION_RUNS))
    need(all(is_int(m) and 1 <= m <= settings.new_tokens for m in settings.memory_at), "memory_at",
         f"memory_at must be token counts between 1 and new_tokens={settings.new_tokens}")
    need(not (settings.beyond_block_size and not config.rope), "beyond_block_size",
         "beyond_block_size must be False unless rope=True (learned positions end at block_size)")
    if settings.vs_transformers:
        gpt2_like = not config.rope and config.n_kv_head == config.n_head and config.window is None and config.bias
        need(gpt2_like, "vs_transformers", "vs_transformers must be False unless the model is GPT-2's architecture "
             "(rope=False, n_kv_head=None, window=None, bias=True)")
        need(settings.use_cache, "vs_transformers",
             "vs_transformers must be False with use_cache=False (transformers decodes with its cache)")
        need(settings.mode == "generate", "vs_transformers", "vs_transformers must be False outside --mode=generate")
    if settings.json_out:
        folder = os.path.dirname(os.path.abspath(settings.json_out))
        need(os.path.isdir(folder) and not os.path.isdir(settings.json_out), "json_out",
             "json_out must be a file path in an existing folder")
    return config


def reset_peak_memory(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux: resets the peak resident set size (VmHWM)
        except OSError:
            pass


def peak_memory_mib(dev):
    if dev.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def build_model(config, dev, attn_impl):
    model = new_model(config.to_dict()).to(dev)
    model.set_attention_impl(attn_impl)
    return model


def kv_bytes_per_token(config, dtype):
    """Bytes of keys and values one position adds to the cache (windowed layers stop adding past their window)."""
    return KVCache(config, 1, 1, "meta", dtype).nbytes()


def bench_train(settings, config, dev, ptdtype):
    model = build_model(config, dev, settings.attn_impl)
    model.gradient_checkpointing = settings.grad_checkpoint
    T = settings.seq_len or config.block_size
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), dev.split(":")[0])
    run = torch.compile(model) if settings.compile else model
    ctx = autocast_context(dev, ptdtype)
    g = torch.Generator().manual_seed(settings.seed)
    x = torch.randint(0, config.vocab_size, (settings.batch_size, T), generator=g).to(dev)
    y = torch.randint(0, config.vocab_size, (settings.batch_size, T), generator=g).to(dev)

    def step():
        with ctx:
            _, loss = run(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    first_step_s = None  # with compile=True the first step compiles: experiments/gpu_check.py reports that apart
    for i in range(settings.warmup_steps):  # compilation, allocator and cache warm-up
        t0 = time.perf_counter()
        step()
        if i == 0:
            sync(dev)
            first_step_s = time.perf_counter() - t0
    sync(dev)
    reset_peak_memory(dev)
    t0 = time.perf_counter()
    for _ in range(settings.steps):
        step()
    sync(dev)
    dt = (time.perf_counter() - t0) / settings.steps
    tokens_per_sec = settings.batch_size * T / dt
    return dict(params=model.get_num_params(), flops_per_token=model.flops_per_token(T), ms_per_iter=dt * 1000,
                tokens_per_sec=tokens_per_sec, mfu=estimate_mfu(model, T, tokens_per_sec, dev),
                peak_mem_mib=peak_memory_mib(dev), kv_bytes_per_token=kv_bytes_per_token(config, getattr(torch, ptdtype)),
                first_step_s=first_step_s)


def bench_attention(settings, config, dev, ptdtype):
    """One layer's attention, forward + backward, n_head heads of head_dim, batch 1."""
    rows = []
    for T in settings.seq_lens:
        for impl in settings.impls:
            if impl == "window-dense" and T > settings.dense_max_T:
                print(f"T={T:6d} {impl:15s} skipped (longer than --dense_max_T={settings.dense_max_T})", flush=True)
                continue
            g = torch.Generator().manual_seed(settings.seed)
            dt_ = getattr(torch, ptdtype)
            q = torch.randn(1, config.n_head, T, config.head_dim, generator=g).to(dev, dt_).requires_grad_()
            k = torch.randn(1, config.n_kv_head, T, config.head_dim, generator=g).to(dev, dt_).requires_grad_()
            v = torch.randn(1, config.n_kv_head, T, config.head_dim, generator=g).to(dev, dt_).requires_grad_()
            windowed, kernel = ATTENTION_RUNS[impl]
            w = settings.bench_window if windowed else None

            def run_once(q, k, v):
                y = causal_attention(q, k, v, w, kernel)
                y.sum().backward()
                q.grad = k.grad = v.grad = None

            run_once(q, k, v)  # warm-up
            sync(dev)
            reset_peak_memory(dev)
            t0 = time.perf_counter()
            for _ in range(settings.attn_repeats):
                run_once(q, k, v)
            sync(dev)
            ms = (time.perf_counter() - t0) / settings.attn_repeats * 1000
            rows.append(dict(T=T, impl=impl, window=w, ms_fwd_bwd=ms, peak_mem_mib=peak_memory_mib(dev)))
            print(f"T={T:6d} {impl:15s} {ms:10.1f} ms  peak {rows[-1]['peak_mem_mib'] or 0:9.1f} MiB", flush=True)
            del q, k, v
    return rows


@torch.no_grad()
def bench_generate(settings, config, dev, ptdtype):
    if settings.vs_transformers:
        return bench_generate_vs_transformers(settings, config, dev, ptdtype)
    model = build_model(config, dev, settings.attn_impl).eval()
    ctx = autocast_context(dev, ptdtype)
    g = torch.Generator().manual_seed(settings.seed)
    prompt = torch.randint(0, config.vocab_size, (settings.gen_batch_size, settings.prompt_len), generator=g).to(dev)
    result = dict(params=model.get_num_params(), batch_size=settings.gen_batch_size, use_cache=settings.use_cache,
                  new_tokens=settings.new_tokens)
    with ctx:
        list(model.generate_stream(prompt, 4, temperature=0, use_cache=settings.use_cache))  # warm-up
        seconds, memory = [], {}
        for _ in range(settings.gen_repeats):
            sync(dev)
            reset_peak_memory(dev)
            marks = sorted(settings.memory_at)
            t0 = time.perf_counter()
            for i, _ in enumerate(model.generate_stream(prompt, settings.new_tokens, temperature=0, use_cache=settings.use_cache,
                                                        beyond_block_size=settings.beyond_block_size), start=1):
                if marks and i == marks[0]:
                    memory[i] = peak_memory_mib(dev)
                    marks.pop(0)
            sync(dev)
            seconds.append(time.perf_counter() - t0)
    dt = statistics.median(seconds)
    result.update(tokens_per_sec=settings.gen_batch_size * settings.new_tokens / dt, seconds=dt, peak_mem_mib=peak_memory_mib(dev))
    if memory:
        result["peak_mem_mib_at"] = memory
    if settings.use_cache:  # the cache generate_stream makes for this prompt
        positions = KVCache.positions_needed(config, settings.prompt_len, settings.new_tokens, settings.beyond_block_size)
        result["kv_cache_bytes"] = KVCache(config, settings.gen_batch_size, positions, "meta", getattr(torch, ptdtype)).nbytes()
    return result


def bench_generate_vs_transformers(settings, config, dev, ptdtype):
    """
    transformers' GPT2LMHeadModel with random weights (its own init, seeded), saved to a temporary folder
    and loaded here the way any GPT-2 folder is (common.load_model): the same weights in both. Greedy
    decoding of the same random prompt by each, alternating, gen_repeats times; the tokens must be
    identical in float32. With --dtype=bfloat16 both models hold bf16 weights (a separate, inexact
    comparison: the length of the common prefix is reported instead of checked).
    """
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
    batch, prompt_len, new_tokens = settings.gen_batch_size, settings.prompt_len, settings.new_tokens
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(settings.seed)
    hf_config = GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                           n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(hf_config).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_pretrained(folder, need_decoding=False).model.eval()
    weights = getattr(torch, ptdtype)
    hf.to(dev, weights)
    ours.to(dev, weights)
    hf.generation_config.eos_token_id = None  # random weights may pick <|endoftext|>: never stop early
    g = torch.Generator().manual_seed(settings.seed)
    prompt = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=g).to(dev)

    def run_ours(n):
        return ours.generate(prompt, n, temperature=0)

    def run_hf(n):
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False, pad_token_id=0)

    run_ours(4), run_hf(4)  # warm-up
    seconds = {"ours": [], "transformers": []}
    for _ in range(settings.gen_repeats):
        for name, fn in (("ours", run_ours), ("transformers", run_hf)):
            sync(dev)
            t0 = time.perf_counter()
            out = fn(new_tokens)
            sync(dev)
            seconds[name].append(time.perf_counter() - t0)
            if name == "ours":
                ours_out = out
            else:
                hf_out = out
    assert ours_out.shape == hf_out.shape == (batch, prompt_len + new_tokens), (ours_out.shape, hf_out.shape)
    differs = (ours_out != hf_out).any(dim=0).nonzero()
    same_prefix = int(differs[0]) - prompt_len if len(differs) else new_tokens
    if ptdtype == "float32" and same_prefix != new_tokens:
        raise AssertionError(f"greedy tokens differ from transformers' at new token {same_prefix} in float32")
    tps = {name: batch * new_tokens / statistics.median(s) for name, s in seconds.items()}
    return dict(params=ours.get_num_params(), batch_size=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                weights_dtype=ptdtype, tokens_identical=same_prefix == new_tokens, identical_new_tokens=same_prefix,
                tokens_per_sec=tps["ours"], transformers_tokens_per_sec=tps["transformers"],
                speedup_vs_transformers=tps["ours"] / tps["transformers"], repeats=settings.gen_repeats)


def main():
    settings = read_settings(globals(), sys.argv[1:])
    config = check_settings(settings)
    dev = pick_device(settings.device)
    ptdtype = pick_dtype(settings.dtype, dev)
    if settings.mode == "attention" and "window-flex" in settings.impls and not dev.startswith("cuda"):
        raise UserError(f"--impls={settings.impls!r} is out of range on {dev}: window-flex needs CUDA "
                        f"(FlexAttention has no backward on a CPU in this torch)")
    torch.manual_seed(settings.seed)
    bench = {"train": bench_train, "attention": bench_attention, "generate": bench_generate}[settings.mode]
    try:
        result = bench(settings, config, dev, ptdtype)
    except ConfigError as e:
        raise UserError(str(e)) from None
    device_name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else f"{dev} ({torch.get_num_threads()} threads)"
    record = dict(mode=settings.mode, device=device_name, dtype=ptdtype, settings=vars(settings), result=result)
    if settings.mode != "attention":
        for key, value in result.items():
            print(f"{key:>28}: {value:,.4g}" if isinstance(value, float) else f"{key:>28}: {value}")
    if settings.json_out:
        with open(settings.json_out, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    run_main(main)
