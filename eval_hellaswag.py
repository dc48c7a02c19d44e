"""
HellaSwag accuracy of a GPT-2 BPE model, scored completion-style as llm.c and build-nanogpt do, so
the figures compare with theirs:

    python data/hellaswag/prepare.py                                   # once: data/hellaswag/hellaswag_val.jsonl
    python eval_hellaswag.py --init_from=gpt2                          # OpenAI's GPT-2 (124M), the reference point
    python eval_hellaswag.py --init_from=resume --out_dir=out-gpt2-fineweb --max_examples=1000
    torchrun --standalone --nproc_per_node=8 eval_hellaswag.py --init_from=gpt2-xl

Each example is a context and four endings, one of them right. Each ending is scored on the
context's tokens followed by the tokens of " " + ending, with the loss summed over the ending's
tokens only: `acc` picks the ending with the lowest summed loss, `acc_norm` the one with the lowest
mean loss per ending token. The four endings of an example run as one batch, right-padded, with the
padding left out of the loss.

A context too long for the model: the model's input (context and ending, less the ending's last
token, which is only a target) keeps its last block_size tokens, so the context loses tokens at its
start and the ending is never cut. An ending longer than block_size tokens is an error.

Under torchrun the examples are shared out over the processes and the scores gathered, so every
process ends with the same result; evaluate_hellaswag does the same inside train.py.
"""

import os
import sys
import json
import math

import torch
import torch.distributed as dist
from torch.nn import functional as F

from configurator import read_settings
from common import UserError, run_main, pick_device, pick_dtype, autocast_context, load_model, get_tokenizer
from checkpoint import describe_trained
from runlog import RunLog

# -----------------------------------------------------------------------------
init_from = "resume"  # 'resume' (from out_dir) | 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl' | a local HF directory
checkpoint = "auto"  # with resume: 'auto' (best.pt when present, else ckpt.pt) | 'best' (best.pt) | 'last' (ckpt.pt)
out_dir = "out"
data_path = os.path.join("data", "hellaswag", "hellaswag_val.jsonl")
max_examples = 0  # 0: all of them; N: the first N examples of the file
device = "auto"
dtype = "auto"
predictions_path = ""  # when set, each example's scores go there as JSON lines
# -----------------------------------------------------------------------------

N_ENDINGS = 4


def load_hellaswag(path: str) -> list[dict]:
    """
    The examples of a HellaSwag file in the original release's JSON lines format, in file order, as
    dicts with at least ctx (text), endings (four texts) and label (0-3). A missing file, or a line
    that is not such an example, is a UserError that names the line.
    """
    if not os.path.isfile(path):
        raise UserError(f"no HellaSwag data at {path}; download it with python data/hellaswag/prepare.py "
                        f"(or point --data_path at hellaswag_val.jsonl)")
    examples = []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            def bad(why, line_number=line_number):
                return UserError(f"{path}, line {line_number}: {why}; this is not a HellaSwag file in the original "
                                 f"JSON lines format (download it again with python data/hellaswag/prepare.py)")
            if not raw.strip():
                continue
            try:
                example = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise bad("not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise bad(f"not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(example, dict):
                raise bad(f"a JSON {type(example).__name__}, not an object")
            missing = [key for key in ("ctx", "endings", "label") if key not in example]
            if missing:
                raise bad(f"no {', '.join(repr(key) for key in missing)}")
            ctx, endings, label = example["ctx"], example["endings"], example["label"]
            if not isinstance(ctx, str) or not ctx:
                raise bad(f"'ctx' must be a non-empty text, got {ctx!r:.60}")
            if not isinstance(endings, list) or len(endings) != N_ENDINGS or not all(isinstance(e, str) for e in endings):
                raise bad(f"'endings' must be a list of {N_ENDINGS} texts, got {endings!r:.100}")
            if type(label) is not int or not 0 <= label < N_ENDINGS:
                raise bad(f"'label' must be 0, 1, 2 or 3, got {label!r}")
            examples.append(example)
    if not examples:
        raise UserError(f"{path} holds no examples; download it again with python data/hellaswag/prepare.py")
    return examples


def example_rows(example, encode, block_size, index=0):
    """
    The four rows of an example: (input ids, target ids) with the targets -1 (ignored) on the context
    and the ending's tokens on the ending. The sequence is context + ending; the input is all of it
    but its last token, left-truncated to block_size tokens.
    """
    ctx_ids = encode(example["ctx"])
    rows = []
    for j, ending in enumerate(example["endings"]):
        end_ids = encode(" " + ending)
        if len(end_ids) > block_size:
            raise UserError(f"HellaSwag example {index}: ending {j} is {len(end_ids)} tokens, more than the model's "
                            f"block_size of {block_size}; it cannot be scored")
        tokens = (ctx_ids + end_ids)[-(block_size + 1):]
        inputs, targets = tokens[:-1], tokens[1:]
        targets = [-1] * (len(targets) - len(end_ids)) + targets[-len(end_ids):]
        rows.append((inputs, targets))
    return rows


def score_rows(model, rows, device, autocast_ctx):
    """(summed loss over the ending tokens, number of ending tokens) of each row, from one batched forward."""
    T = max(len(inputs) for inputs, _ in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)  # right padding: causal attention never looks at it
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, (inputs, targets) in enumerate(rows):
        x[r, :len(inputs)] = torch.tensor(inputs)
        y[r, :len(targets)] = torch.tensor(targets)
    x, y = x.to(device), y.to(device)
    with autocast_ctx:
        logits, _ = model(x)
    losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
    return losses.view_as(y).sum(dim=1), (y != -1).sum(dim=1)


def model_config(model):
    """The GPTConfig of a model, also through DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while not hasattr(model, "config"):
        model = getattr(model, "module", None) or model._orig_mod
    return model.config


@torch.no_grad()
def evaluate_hellaswag(model, examples: list[dict], device, autocast_ctx, encode, rank: int = 0, world_size: int = 1) -> dict:
    """
    Scores `examples` (from load_hellaswag) and returns dict(n, acc, acc_norm, pred, pred_norm, sum_loss,
    n_tokens): pred / pred_norm the chosen ending of each example by summed / mean loss, sum_loss and
    n_tokens the scores of its four endings. With world_size > 1 (the process group initialised),
    process `rank` scores examples rank, rank + world_size, ... and the scores are all-reduced, so every
    process returns the same result. Every process runs the same number of forward passes, as FSDP
    needs: one left without an example repeats the last one and drops its scores.
    A context too long for the model keeps its last tokens, the ending always whole (example_rows).
    The model may be wrapped (DDP, FSDP, torch.compile); it is put in eval mode and back as it was.
    """
    n = len(examples)
    if n == 0:
        raise UserError("no HellaSwag examples to evaluate")
    block_size = model_config(model).block_size
    sum_loss = torch.zeros(n, N_ENDINGS, device=device)
    n_tokens = torch.zeros(n, N_ENDINGS, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    for j in range(math.ceil(n / world_size)):
        i = j * world_size + rank
        rows = example_rows(examples[min(i, n - 1)], encode, block_size, min(i, n - 1))
        losses, counts = score_rows(model, rows, device, autocast_ctx)
        if i < n:
            sum_loss[i], n_tokens[i] = losses, counts
    model.train(was_training)
    if world_size > 1:  # each example's row is filled on one process and zero on the others: the sum is exact
        dist.all_reduce(sum_loss)
        dist.all_reduce(n_tokens)
    labels = torch.tensor([example["label"] for example in examples], device=device)
    pred = sum_loss.argmin(dim=1)  # the first of equal losses, as in a loop over the endings
    pred_norm = (sum_loss / n_tokens).argmin(dim=1)
    # exact fractions (not a float32 mean), so that train.py's sum over chunks of examples gives the same numbers
    return dict(n=n, acc=int((pred == labels).sum()) / n, acc_norm=int((pred_norm == labels).sum()) / n,
                pred=pred.tolist(), pred_norm=pred_norm.tolist(), sum_loss=sum_loss.tolist(), n_tokens=n_tokens.tolist())


def main():
    settings = read_settings(globals(), sys.argv[1:])
    if settings.max_examples < 0:
        raise UserError(f"--max_examples must be >= 0 (0: all), got {settings.max_examples}")
    if settings.init_from == "scratch":
        raise UserError("eval_hellaswag.py needs a trained model: use --init_from=resume (with --out_dir), a GPT-2 name or a folder")
    if settings.predictions_path and not os.path.isdir(os.path.dirname(os.path.abspath(settings.predictions_path))):
        raise UserError(f"--predictions_path={settings.predictions_path}: its folder does not exist")
    distributed = "RANK" in os.environ  # launched by torchrun
    rank, local_rank, world_size = 0, 0, 1
    if distributed:
        rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    dev = pick_device(settings.device)
    if distributed and dev.startswith("cuda"):
        dev = f"cuda:{local_rank}"
    ctx = autocast_context(dev, pick_dtype(settings.dtype, dev))

    examples = load_hellaswag(settings.data_path)
    if settings.max_examples:
        examples = examples[:settings.max_examples]
    loaded = load_model(settings.init_from, settings.out_dir, overrides=dict(dropout=0.0), which=settings.checkpoint)
    if loaded.path is not None and rank == 0:
        print(describe_trained(loaded))
    if loaded.chars is not None:
        raise UserError(f"{settings.init_from} is a character-level model; HellaSwag is English text scored in GPT-2 BPE tokens")
    encode = get_tokenizer().encode
    block_size = loaded.model.config.block_size
    for index, example in enumerate(examples):  # an ending that does not fit is reported before any work
        example_rows(example, encode, block_size, index)

    if distributed:
        if dev.startswith("cuda"):
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    try:
        result = evaluate_hellaswag(loaded.model.to(dev), examples, dev, ctx, encode, rank, world_size)
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank != 0:
        return
    print(f"hellaswag: {result['n']} examples, acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f}")
    if settings.predictions_path:
        with open(settings.predictions_path, "w", encoding="utf-8") as f:
            for i, example in enumerate(examples):
                f.write(json.dumps(dict(index=i, label=example["label"], pred=result["pred"][i],
                                        pred_norm=result["pred_norm"][i], sum_loss=result["sum_loss"][i],
                                        n_tokens=result["n_tokens"][i])) + "\n")
    if settings.init_from == "resume":  # the run's own log, appended as train.py appends it
        log = RunLog(settings.out_dir, active=True)
        try:
            log.metrics(dict(event="hellaswag", iter=loaded.checkpoint.get("iter_num"), hellaswag_acc=result["acc"],
                             hellaswag_acc_norm=result["acc_norm"], hellaswag_n=result["n"]))
        finally:
            log.close()


if __name__ == "__main__":
    run_main(main)
