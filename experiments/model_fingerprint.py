"""
The model's outputs, to show a refactoring changed none of them bitwise: forward logits, losses and
gradients for every attention variant x kernel x precision, generation (greedy, sampled, streamed, with and
without the KV cache, past block_size), KV cache contents, gradient checkpointing. It reaches the model only
through interfaces older checkouts also have (GPT, GPTConfig, set_attention_impl, generate), so it runs on
both sides of a change:

    cd /path/to/before && python /path/to/this/experiments/model_fingerprint.py /tmp/before.pt
    cd /path/to/after  && python experiments/model_fingerprint.py /tmp/after.pt
    python experiments/model_fingerprint.py --compare /tmp/before.pt /tmp/after.pt   # "N outputs compared, 0 differ"

Run it in the checkout to fingerprint (the repository root is the working directory).
"""
import sys
import os

if sys.argv[1:2] == ["--compare"]:
    import torch
    a, b = torch.load(sys.argv[2], weights_only=True), torch.load(sys.argv[3], weights_only=True)
    assert a.keys() == b.keys(), set(a) ^ set(b)
    bad = [k for k in a if not (a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]))]
    print(f"{len(a)} outputs compared, {len(bad)} differ")
    print("\n".join(bad[:20]))
    sys.exit(1 if bad else 0)

sys.path.insert(0, os.getcwd())
import torch
from model import GPT, GPTConfig

torch.set_num_threads(1)
out = {}

def put(name, t):
    assert name not in out, name
    out[name] = t.detach().clone()

BASE = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=97, block_size=64, bias=True)
CONFIGS = {
    "gpt2": {},
    "nobias": dict(bias=False),
    "rope": dict(rope=True),
    "gqa": dict(n_kv_head=2),
    "mqa_rope": dict(n_kv_head=1, rope=True),
    "win": dict(window=8),
    "win_rope": dict(window=8, rope=True),
    "win_layers": dict(window=(4, None), rope=True, n_kv_head=2),
    "qk_norm": dict(qk_norm=True, rope=True),
    "relu2": dict(mlp_act="relu2"),
    "all": dict(rope=True, n_kv_head=2, window=(6, 16), qk_norm=True, mlp_act="relu2", bias=False),
    "dropout": dict(dropout=0.1, window=8, rope=True),
    "wide_long": dict(n_head=2, n_embd=128, block_size=640, window=16, rope=True),  # T*hd >= 32768 at T=600
    "long": dict(block_size=640, window=16, rope=True, n_kv_head=2),
}

def make(name, seed=1234):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**BASE, **CONFIGS[name]}))

def tokens(cfg, B, T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)

for name in CONFIGS:
    model = make(name)
    cfg = model.config
    lengths = [5, cfg.block_size] if cfg.block_size < 600 else [40, 600]
    impls = ["auto", "dense", "blocked", "flex"] if cfg.window is not None else ["auto"]
    for impl in impls:
        if impl == "flex" and cfg.dropout > 0:
            continue
        model.set_attention_impl(impl)
        for T in lengths:
            idx, tgt = tokens(cfg, 2, T, T), tokens(cfg, 2, T, T + 1)
            for mode in ["fp32", "autocast_bf16", "bf16_model"]:
                if mode == "bf16_model" and (T >= 600 or impl == "flex"):
                    continue
                m = make(name) if mode == "bf16_model" else model
                m.set_attention_impl(impl)
                if mode == "bf16_model":
                    m = m.to(torch.bfloat16)
                key = f"{name}/{impl}/T{T}/{mode}"
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast_bf16" else torch.autocast("cpu", enabled=False)
                if impl != "flex":  # FlexAttention has no backward on a CPU
                    m.train()
                    m.zero_grad(set_to_none=True)
                    torch.manual_seed(7)
                    with ctx:
                        logits, loss = m(idx, tgt)
                    loss.backward()
                    put(key + "/train_logits", logits)
                    put(key + "/loss", loss)
                    for pname, p in m.named_parameters():
                        put(key + "/grad/" + pname, p.grad)
                m.zero_grad(set_to_none=True)
                m.eval()
                with torch.no_grad(), ctx:
                    logits, _ = m(idx)
                    put(key + "/eval_logits", logits)
                    logits, _ = m(idx, last_only=True)
                    put(key + "/eval_last", logits)
    model.set_attention_impl("auto")
    model.eval()
    # generation
    for mode in ["fp32", "autocast_bf16", "bf16_model"]:
        m = make(name).eval() if mode == "bf16_model" else model
        if mode == "bf16_model":
            m = m.to(torch.bfloat16)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast_bf16" else torch.autocast("cpu", enabled=False)
        n_new = 20 if cfg.block_size >= 600 else cfg.block_size + 10  # past block_size
        for B in [1, 3]:
            prompt = tokens(cfg, B, 7, 99 + B)
            with ctx:
                for use_cache in [True, False]:
                    for beyond in ([False, True] if cfg.rope else [False]):
                        key = f"{name}/gen/{mode}/B{B}/cache{use_cache}/beyond{beyond}"
                        put(key + "/greedy", m.generate(prompt, n_new, temperature=0, use_cache=use_cache, beyond_block_size=beyond))
                        g = torch.Generator().manual_seed(5)
                        put(key + "/sampled", m.generate(prompt, n_new, temperature=0.8, top_k=30, top_p=0.9,
                                                         use_cache=use_cache, beyond_block_size=beyond, generator=g))
                        torch.manual_seed(11)
                        put(key + "/sampled_global", m.generate(prompt, 8, temperature=1.3, use_cache=use_cache,
                                                                beyond_block_size=beyond))
                        put(key + "/stream", torch.cat(list(m.generate_stream(prompt, 6, temperature=0, use_cache=use_cache,
                                                                               beyond_block_size=beyond)), dim=1))
            # a long prompt: prefill longer than the window (rolling buffer) and decode
            if cfg.window is not None:
                long_prompt = tokens(cfg, B, min(cfg.block_size - 5, 50), 3)
                with ctx:
                    put(f"{name}/gen/{mode}/B{B}/longprompt", m.generate(long_prompt, 12, temperature=0))
                    put(f"{name}/gen/{mode}/B{B}/longprompt_beyond",
                        m.generate(long_prompt, 30, temperature=0, beyond_block_size=True) if cfg.rope else long_prompt)
    # logits through a KV cache: a prefill, one-token decode steps, then a multi-token step
    try:
        from generation import KVCache
    except ImportError:
        from model import KVCache
    for mode in ["fp32", "autocast_bf16", "bf16_model"]:
        m = make(name).eval() if mode == "bf16_model" else model
        dtype = torch.float32
        if mode == "bf16_model":
            m, dtype = m.to(torch.bfloat16), torch.bfloat16
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast_bf16" else torch.autocast("cpu", enabled=False)
        if mode == "autocast_bf16":
            dtype = torch.bfloat16
        seq = tokens(cfg, 2, 30, 77)
        for prefill in [1, 12, 20]:
            cache = KVCache(cfg, 2, 30, "cpu", dtype)
            with torch.no_grad(), ctx:
                logits, _ = m(seq[:, :prefill], kv_cache=cache)
                put(f"{name}/cache/{mode}/p{prefill}/prefill", logits)
                for i in range(prefill, prefill + 4):
                    logits, _ = m(seq[:, i:i + 1], kv_cache=cache)
                    put(f"{name}/cache/{mode}/p{prefill}/step{i}", logits)
                windows = [cfg.layer_window(i) for i in range(cfg.n_layer) if cfg.layer_window(i)]
                if not windows or prefill + 7 <= min(windows):
                    logits, _ = m(seq[:, prefill + 4:prefill + 7], kv_cache=cache)
                    put(f"{name}/cache/{mode}/p{prefill}/multi", logits)
            for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
                put(f"{name}/cache/{mode}/p{prefill}/k{i}", k)
                put(f"{name}/cache/{mode}/p{prefill}/v{i}", v)
    # activation checkpointing
    for mode in ["fp32", "autocast_bf16"]:
        m = make(name)
        m.gradient_checkpointing = True
        m.train()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast_bf16" else torch.autocast("cpu", enabled=False)
        idx, tgt = tokens(cfg, 2, 24, 5), tokens(cfg, 2, 24, 6)
        torch.manual_seed(3)
        with ctx:
            _, loss = m(idx, tgt)
        loss.backward()
        put(f"{name}/gradckpt/{mode}/loss", loss)
        for pname, p in m.named_parameters():
            put(f"{name}/gradckpt/{mode}/grad/{pname}", p.grad)
    # weights untouched by generation (cpu_decode_layout restores)
    for pname, p in model.named_parameters():
        put(f"{name}/after_gen/{pname}", p)
        put(f"{name}/after_gen_stride/{pname}", torch.tensor(p.stride()))

torch.save(out, sys.argv[1])
print(len(out), "outputs saved to", sys.argv[1])
