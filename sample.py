"""
Samples from a trained model (--init_from=resume reads out_dir/best.pt, the best-validated weights, when the run
has written one, else out_dir/ckpt.pt; --checkpoint=best|last picks one) or from OpenAI's GPT-2
(--init_from=gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local directory in the HF format).

    python sample.py --out_dir=out-shakespeare-char-cpu
    python sample.py --init_from=gpt2 --start="The meaning of life is" --top_p=0.9
"""

import os
import sys
import math
import time

import torch

from model import ConfigError, GPT2_NAMES, validate_sampling
from configurator import apply_overrides
from common import (UserError, run_main, pick_device, pick_dtype, autocast_context, load_model, get_tokenizer,
                    is_pretrained_source)
from checkpoint import describe_trained

# -----------------------------------------------------------------------------
init_from = "resume"  # 'resume' (from out_dir) | 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl' | a local HF directory
out_dir = "out"
checkpoint = "auto"  # with resume: 'auto' (best.pt when present, else ckpt.pt) | 'best' (best.pt) | 'last' (ckpt.pt)
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


def check_settings() -> tuple[str, str]:
    """Every setting against its range before any work: a value outside it is one line that names the
    key and the range. Returns the device and dtype to run in."""
    if init_from == "scratch":
        raise UserError("sample.py needs a trained model: use --init_from=resume (with --out_dir), a GPT-2 name or a folder")
    if init_from != "resume" and not is_pretrained_source(init_from):
        raise UserError(f"init_from must be resume, one of {', '.join(GPT2_NAMES)} or an existing folder in the "
                        f"Hugging Face format, got {init_from!r}")
    if num_samples < 1:
        raise UserError(f"num_samples must be an integer >= 1, got {num_samples}")
    if not 0 <= seed < 2**64:
        raise UserError(f"seed must be an integer in 0 .. 2**64 - 1, got {seed}")
    if not math.isfinite(temperature):
        raise UserError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))):
        raise UserError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    try:
        validate_sampling(max_new_tokens, temperature, top_k, top_p)
    except ConfigError as e:
        raise UserError(str(e)) from None
    if stream is not None and not isinstance(stream, bool):
        raise UserError(f"stream must be True, False or None (None: on when writing to a terminal), got {stream!r}")
    dev = pick_device(device)
    return dev, pick_dtype(dtype, dev)


def read_prompt() -> str:
    """The prompt text: --start itself, or the contents of the file named by --start=FILE:path."""
    if not start.startswith("FILE:"):
        return start
    path = start[5:]
    if not os.path.isfile(path):
        raise UserError(f"prompt file {path!r} (start=FILE:{path}) does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read prompt file {path}: {e.strerror or e}") from None


def main():
    apply_overrides(globals(), sys.argv[1:], nullable={"top_k"})
    dev, ptdtype = check_settings()
    ctx = autocast_context(dev, ptdtype)
    # read the prompt before loading the model: a missing file is then reported at once, and
    # alone on stderr (loading a Hugging Face checkpoint prints progress bars there)
    prompt = read_prompt()
    torch.manual_seed(seed)
    loaded = load_model(init_from, out_dir, overrides=dict(dropout=0.0), which=checkpoint)
    model, chars = loaded.model.to(dev).eval(), loaded.chars
    tokenizer = get_tokenizer(chars)

    ids = tokenizer.encode(prompt) if prompt else tokenizer.start_ids
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
                    text = tokenizer.decode(new_ids)
                    if not text.endswith("\ufffd"):  # hold back a half-decoded multi-byte character
                        print(text[len(printed):], end="", flush=True)
                        printed = text
        elapsed += time.time() - t0
        generated += len(new_ids)
        if show_stream:
            print(tokenizer.decode(new_ids)[len(printed):])
        else:
            print(prompt + tokenizer.decode(new_ids))
        print("---------------")
    print(f"{generated} tokens in {elapsed:.2f}s: {generated / max(elapsed, 1e-9):.1f} tokens/s "
          f"({'with' if use_cache else 'without'} KV cache, {dev})" + (f"; {describe_trained(loaded)}" if loaded.path else ""),
          file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
