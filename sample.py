"""
Samples from a trained model (--init_from=resume reads out_dir/ckpt.pt) or from OpenAI's GPT-2
(--init_from=gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local directory in the HF format).

    python sample.py --out_dir=out-shakespeare-char-cpu
    python sample.py --init_from=gpt2 --start="The meaning of life is" --top_p=0.9
"""

import os
import sys
import time

import torch

from model import ConfigError, validate_sampling
from configurator import apply_overrides
from common import UserError, run_main, pick_device, pick_dtype, autocast_context, load_model, get_tokenizer

# -----------------------------------------------------------------------------
init_from = "resume"  # 'resume' (from out_dir) | 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl' | a local HF directory
out_dir = "out"
start = "\n"  # the prompt, or "FILE:prompt.txt"; "" starts from <|endoftext|> (GPT-2 BPE only)
num_samples = 3
max_new_tokens = 500
temperature = 0.8  # 1.0: the model's distribution; 0: greedy
top_k = 200  # None: no top-k filtering
top_p = None  # nucleus sampling: keep the smallest set of tokens whose probability reaches top_p
seed = 1337
device = "auto"
dtype = "auto"
use_cache = True  # KV cache: one position per new token instead of the whole context
stream = None  # print tokens as they come; None: on when writing to a terminal
beyond_block_size = False  # with rope, keep generating past block_size instead of sliding the context
# -----------------------------------------------------------------------------


def main():
    apply_overrides(globals(), sys.argv[1:], nullable={"top_k"})
    try:
        validate_sampling(max_new_tokens, temperature, top_k, top_p)
    except ConfigError as e:
        raise UserError(str(e)) from None
    if num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {num_samples}")
    dev = pick_device(device)
    ctx = autocast_context(dev, pick_dtype(dtype, dev))
    torch.manual_seed(seed)
    # read the prompt before loading the model: a missing file is then reported at once, and
    # alone on stderr (loading a Hugging Face checkpoint prints progress bars there)
    prompt = start
    if prompt.startswith("FILE:"):
        path = prompt[5:]
        if not os.path.isfile(path):
            raise UserError(f"prompt file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            prompt = f.read()
    if init_from == "scratch":
        raise UserError("sample.py needs a trained model: use --init_from=resume (with --out_dir), a GPT-2 name or a folder")
    loaded = load_model(init_from, out_dir, overrides=dict(dropout=0.0))
    model, chars = loaded.model.to(dev).eval(), loaded.chars
    encode, decode, start_ids = get_tokenizer(chars)

    ids = encode(prompt) if prompt else start_ids
    if not ids:
        raise UserError("the prompt is empty and this vocabulary has no start token; give some text with --start")
    x = torch.tensor(ids, dtype=torch.long, device=dev)[None, ...]
    show_stream = stream if stream is not None else sys.stdout.isatty()

    generated, elapsed = 0, 0.0
    for _ in range(num_samples):
        t0 = time.time()
        new_ids = []
        printed = ""
        if show_stream:
            print(prompt, end="", flush=True)
        with ctx:
            for token in model.generate_stream(x, max_new_tokens, temperature, top_k, top_p, use_cache, beyond_block_size):
                new_ids.append(token.item())
                if show_stream:
                    text = decode(new_ids)
                    if not text.endswith("\ufffd"):  # hold back a half-decoded multi-byte character
                        print(text[len(printed):], end="", flush=True)
                        printed = text
        elapsed += time.time() - t0
        generated += len(new_ids)
        if show_stream:
            print(decode(new_ids)[len(printed):])
        else:
            print(prompt + decode(new_ids))
        print("---------------")
    print(f"{generated} tokens in {elapsed:.2f}s: {generated / max(elapsed, 1e-9):.1f} tokens/s "
          f"({'with' if use_cache else 'without'} KV cache, {dev})", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
