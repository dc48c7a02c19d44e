"""
FineWeb-Edu in GPT-2 BPE tokens: the `sample-10BT` subset of HuggingFaceFW/fineweb-edu (9.67M
educational web pages, ~10B tokens), the data llm.c and build-nanogpt reproduce GPT-2 (124M) on.
Writes train.bin (~9.9B tokens, ~20 GB) and val.bin (~100M tokens) as uint16 token ids.

    python data/fineweb_edu/prepare.py                    # all of sample-10BT
    python data/fineweb_edu/prepare.py --num_docs=20000   # a small version for a laptop (~20M tokens)

The full run downloads the hub's parquet files through `datasets` (no loading script) and lets
`datasets` convert them into its memory-mapped Arrow cache: plan on ~100 GB of free disk (download,
cache and bins). With --num_docs it streams only the first N documents instead.

- Tokens: tiktoken's GPT-2 encoding in a pool of --num_proc processes; every document is followed by
  <|endoftext|> (50256), the separator GPT-2 was trained with.
- Validation: the first 100,000,000 tokens of the stream (the documents in the data set's own order,
  the one that straddles the boundary cut there), the rest is training: llm.c's and build-nanogpt's
  split (their first 100M-token shard is validation), so validation losses compare with theirs. With
  --num_docs=N the validation part is the first 10*N tokens (~1%, as 100M is of 10B); --val_tokens sets it.
- Memory: the documents are read, tokenised and appended to the bins a chunk at a time.
- Interrupted (Ctrl-C, a crash, a lost machine)? Run the same command again: after each chunk the
  bins are flushed to disk and progress_train_val.json records how far they got, so a new run
  cuts off whatever a chunk half wrote and continues from there. The bins end up byte for byte the
  same as an uninterrupted run's.

OpenWebText's prepare.py writes its bins with the same tokenize_and_write.
"""

import os
import sys
import json
import argparse
import contextlib
import multiprocessing as mp

import numpy as np
import tiktoken
from tqdm import tqdm

DATASET, SUBSET = "HuggingFaceFW/fineweb-edu", "sample-10BT"
VAL_TOKENS = 100_000_000  # llm.c and build-nanogpt: shard 0 of 1e8 tokens is validation
VAL_TOKENS_PER_DOC = 10  # with --num_docs=N: the first 10*N tokens (~1%: FineWeb-Edu's documents average ~1,000 tokens)
NUM_PROC = max(1, (os.cpu_count() or 2) // 2)
DOCS_PER_CHUNK = 20_000  # ~20M tokens, ~100 MB of text: what a restart may redo, and what is held in memory
FOLDER = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# tokenise and write: shared with data/openwebtext/prepare.py

_enc = None


def encode_document(text: str) -> np.ndarray:
    """A document's GPT-2 tokens followed by <|endoftext|>; special-token text in it is plain text."""
    global _enc
    if _enc is None:  # once per worker process
        _enc = tiktoken.get_encoding("gpt2")
    ids = _enc.encode_ordinary(text)
    ids.append(_enc.eot_token)
    return np.array(ids, dtype=np.uint16)  # GPT-2's ids are < 50257 < 2**16


def progress_path(folder, splits):
    return os.path.join(folder, f"progress_{'_'.join(splits)}.json")


def read_progress(path, settings, bins):
    """The progress a previous run recorded, or None to start afresh. A record of other settings, or
    bins shorter than it says, would make a corrupt mix: that is an error, not a guess."""
    if not os.path.exists(path):
        return None
    start_over = f"delete {path} to start over"
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        done, tokens = state["documents_done"], state["tokens"]
    except (ValueError, KeyError, TypeError):  # not JSON, or not a progress record
        sys.exit(f"error: {path} is damaged; {start_over}")
    if state.get("settings") != settings:
        sys.exit(f"error: {path} records a run with other settings ({state.get('settings')}, now {settings}); "
                 f"run with the same settings to continue it, or {start_over}")
    if not (isinstance(done, int) and isinstance(tokens, dict) and set(tokens) == set(bins)):
        sys.exit(f"error: {path} is damaged; {start_over}")
    for split, path_bin in bins.items():
        have = os.path.getsize(path_bin) // 2 if os.path.exists(path_bin) else 0
        if have < tokens[split]:
            sys.exit(f"error: {path_bin} has {have:,} tokens but {path} says {tokens[split]:,} were written; {start_over}")
    return state


def write_progress(path, state):
    """Atomically: a crash leaves the previous record or the new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tokenize_and_write(dataset, folder, split_of=None, splits=("train", "val"), num_proc=NUM_PROC,
                       docs_per_chunk=DOCS_PER_CHUNK, settings=None, text_column="text", val_tokens=VAL_TOKENS) -> dict[str, int]:
    """
    Tokenises the documents of `dataset` (a datasets.Dataset) in order and appends them to folder/<split>.bin:
    with split_of, document i to split_of(i)'s bin (one of `splits`); without it, the first val_tokens
    tokens of the stream to val.bin and the rest to train.bin (a document at the boundary is cut). Chunk by chunk: read docs_per_chunk
    documents, tokenise them with num_proc processes, append, flush to disk, record the progress in
    progress_<splits>.json; a later call with the same settings continues from the last record.
    `settings` (JSON values) describe what is being written, so that a run never continues another's.
    Returns {split: number of tokens}.
    """
    n_docs = len(dataset)
    settings = dict(settings or {}, documents=n_docs, splits=list(splits))
    bins = {split: os.path.join(folder, f"{split}.bin") for split in splits}
    state_path = progress_path(folder, splits)
    state = read_progress(state_path, settings, bins)
    if state is not None and state.get("complete"):
        print(f"{', '.join(bins.values())}: already complete ({state_path})")
        return dict(state["tokens"])
    if state is None:
        state = dict(settings=settings, documents_done=0, tokens={split: 0 for split in splits}, complete=False)
    elif state["documents_done"]:
        print(f"continuing at document {state['documents_done']:,} of {n_docs:,} ({state_path})")
    tokens = state["tokens"]
    dataset = dataset.select_columns([text_column])

    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(mp.Pool(num_proc)) if num_proc > 1 else None  # leaving it terminates the workers
        files = {}
        for split, path in bins.items():
            files[split] = stack.enter_context(open(path, "r+b" if os.path.exists(path) else "w+b"))
            files[split].truncate(2 * tokens[split])  # drop what an interrupted chunk wrote after the last record
            files[split].seek(0, os.SEEK_END)
        bar = tqdm(total=n_docs, initial=state["documents_done"], unit="docs", desc=f"tokenizing into {folder}")
        for start in range(state["documents_done"], n_docs, docs_per_chunk):
            stop = min(start + docs_per_chunk, n_docs)
            texts = dataset[start:stop][text_column]
            encoded = pool.imap(encode_document, texts, chunksize=16) if pool else map(encode_document, texts)
            parts = {split: [] for split in splits}
            val_room = None if split_of else val_tokens - tokens["val"]  # validation tokens still to write
            for index, ids in enumerate(encoded, start):
                if split_of:
                    parts[split_of(index)].append(ids)
                else:
                    head = ids[:max(val_room, 0)]
                    val_room -= len(head)
                    parts["val"].append(head)
                    parts["train"].append(ids[len(head):])
                bar.update(1)
            for split, arrays in parts.items():
                if arrays:
                    ids = np.concatenate(arrays)
                    files[split].write(ids.tobytes())
                    tokens[split] += len(ids)
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())  # the tokens are on disk before the record that counts them
            state["documents_done"] = stop
            write_progress(state_path, state)
            bar.set_postfix({split: f"{n:,} tokens" for split, n in tokens.items()})
        bar.close()
        state["complete"] = True
        write_progress(state_path, state)
    return dict(tokens)


# -----------------------------------------------------------------------------
# the download

def first_documents(num_docs):
    """The first num_docs documents of the subset, streamed: only those are downloaded."""
    from datasets import load_dataset
    stream = load_dataset(DATASET, name=SUBSET, split="train", streaming=True)
    for row in stream.take(num_docs):
        yield {"text": row["text"]}


def load_fineweb(num_docs=None, num_proc=NUM_PROC):
    """sample-10BT as a memory-mapped datasets.Dataset; with num_docs its first num_docs documents,
    streamed and written to datasets' cache (where a second run finds them)."""
    try:
        import datasets
    except ImportError:
        sys.exit("error: this script needs the datasets package: pip install datasets")
    from datasets.exceptions import DatasetGenerationError
    try:
        if num_docs is None:
            return datasets.load_dataset(DATASET, name=SUBSET, split="train", num_proc=num_proc)
        datasets.load_dataset(DATASET, name=SUBSET, split="train", streaming=True)  # unreachable: fail before any progress bar
        try:
            return datasets.Dataset.from_generator(first_documents, gen_kwargs=dict(num_docs=num_docs))
        except DatasetGenerationError as e:  # what the generator raised is its cause
            if isinstance(e.__cause__, OSError):
                raise e.__cause__ from None
            raise
    except OSError as e:  # no network (ConnectionError), the hub unreachable, a full disk
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(f"error: could not load {DATASET} ({SUBSET}): {reason[:300]}")


def main(argv=None, folder=FOLDER):
    parser = argparse.ArgumentParser(description="Tokenise FineWeb-Edu sample-10BT into train.bin / val.bin (GPT-2 BPE, uint16).")
    parser.add_argument("--num_docs", type=int, default=None,
                        help="only the first N documents (streamed): a small version; default: all 9.67M")
    parser.add_argument("--num_proc", type=int, default=NUM_PROC, help=f"tokenising processes (default {NUM_PROC})")
    parser.add_argument("--val_tokens", type=int, default=None,
                        help=f"validation: the first N tokens of the stream (default {VAL_TOKENS:,}, llm.c's and build-nanogpt's "
                             f"first shard; with --num_docs, {VAL_TOKENS_PER_DOC} per document)")
    args = parser.parse_args(argv)
    if args.num_docs is not None and args.num_docs < 1:
        sys.exit(f"error: --num_docs must be >= 1, got {args.num_docs}")
    if args.num_proc < 1:
        sys.exit(f"error: --num_proc must be >= 1, got {args.num_proc}")
    if args.val_tokens is not None and args.val_tokens < 1:
        sys.exit(f"error: --val_tokens must be >= 1, got {args.val_tokens}")
    val_tokens = args.val_tokens or (VAL_TOKENS if args.num_docs is None else VAL_TOKENS_PER_DOC * args.num_docs)
    dataset = load_fineweb(args.num_docs, args.num_proc)
    settings = dict(dataset=DATASET, subset=SUBSET, num_docs=args.num_docs, val_tokens=val_tokens)
    counts = tokenize_and_write(dataset, folder, num_proc=args.num_proc, settings=settings, val_tokens=val_tokens)
    print(", ".join(f"{split}: {n:,} tokens" for split, n in counts.items()) + f" ({len(dataset):,} documents)")


if __name__ == "__main__":
    main()
