"""
Samples from a trained model (--init_from=resume; which of its files: docs/fault_tolerance.md, "The files of a
run") or from OpenAI's GPT-2 (--init_from=gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local directory in the HF
format).

    python sample.py --out_dir=out-shakespeare-char-cpu
    python sample.py --init_from=gpt2 --start="The meaning of life is" --top_p=0.9
"""

import os
import sys
import math
import time

import torch

from model import GPT2_NAMES
from errors import ConfigError
from generation import validate_sampling
from configurator import read_settings
from common import (UserError, run_main, pick_device, pick_dtype, autocast_context, load_model, get_tokenizer,
                    is_pretrained_source)
from checkpoint import describe_trained

PROMPT_FILE = "FILE:"  # --start=FILE:path reads the prompt from that file

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


def check_settings(settings) -> tuple[str, str]:
    """Every setting against its range before any work: a value outside it is one line that names the
    key and the range. Returns the device and dtype to run in."""
    if settings.init_from == "scratch":
        raise UserError("sample.py needs a trained model: use --init_from=resume (with --out_dir), a GPT-2 name or a folder")
    if settings.init_from != "resume" and not is_pretrained_source(settings.init_from):
        raise UserError(f"init_from must be resume, one of {', '.join(GPT2_NAMES)} or an existing folder in the "
                        f"Hugging Face format, got {settings.init_from!r}")
    if settings.num_samples < 1:
        raise UserError(f"num_samples must be an integer >= 1, got {settings.num_samples}")
    if not 0 <= settings.seed < 2**64:
        raise UserError(f"seed must be an integer in 0 .. 2**64 - 1, got {settings.seed}")
    if not math.isfinite(settings.temperature):
        raise UserError(f"temperature must be a finite number >= 0 (0 is greedy), got {settings.temperature}")
    if settings.top_p is not None and (isinstance(settings.top_p, bool) or not isinstance(settings.top_p, (int, float))):
        raise UserError(f"top_p must be None or a number in (0, 1], got {settings.top_p!r}")
    try:
        validate_sampling(settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p)
    except ConfigError as e:
        raise UserError(str(e)) from None
    if settings.stream is not None and not isinstance(settings.stream, bool):
        raise UserError(f"stream must be True, False or None (None: on when writing to a terminal), got {settings.stream!r}")
    dev = pick_device(settings.device)
    return dev, pick_dtype(settings.dtype, dev)


def read_prompt(start: str) -> str:
    """The prompt text: --start itself, or the contents of the file named by --start=FILE:path."""
    if not start.startswith(PROMPT_FILE):
        return start
    path = start.removeprefix(PROMPT_FILE)
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
    settings = read_settings(globals(), sys.argv[1:], nullable={"top_k"})
    dev, ptdtype = check_settings(settings)
    ctx = autocast_context(dev, ptdtype)
    # read the prompt before loading the model: a missing file is then reported at once, and
    # alone on stderr (loading a Hugging Face checkpoint prints progress bars there)
    prompt = read_prompt(settings.start)
    torch.manual_seed(settings.seed)
    loaded = load_model(settings.init_from, settings.out_dir, overrides=dict(dropout=0.0), which=settings.checkpoint)
    model, chars = loaded.model.to(dev).eval(), loaded.chars
    tokenizer = get_tokenizer(chars)

    ids = tokenizer.encode(prompt) if prompt else tokenizer.start_ids
    if not ids:
        source = f"prompt file {settings.start.removeprefix(PROMPT_FILE)}" if settings.start.startswith(PROMPT_FILE) else "prompt"
        raise UserError(f"the {source} is empty and this vocabulary has no start token; give some text with --start")
    x = torch.tensor(ids, dtype=torch.long, device=dev)[None, ...]
    show_stream = settings.stream if settings.stream is not None else sys.stdout.isatty()

    generated, elapsed = 0, 0.0
    for _ in range(settings.num_samples):
        t0 = time.time()
        new_ids = []
        printed = ""
        if show_stream:
            print(prompt, end="", flush=True)
        with ctx:
            for token in model.generate_stream(x, settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p,
                                                    settings.use_cache, settings.beyond_block_size):
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
          f"({'with' if settings.use_cache else 'without'} KV cache, {dev})" + (f"; {describe_trained(loaded)}" if loaded.path else ""),
          file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
