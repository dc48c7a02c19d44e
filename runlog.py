"""The run log: console lines for people, out_dir/metrics.jsonl for programs (and wandb when asked)."""

import os
import sys
import json
import math
import errno

from durable import unwritable


def ends_inside_a_line(path: str) -> bool:
    """Whether the file ends without its last newline: a record that a crash tore mid-write. Whoever appends
    to it starts a new line first, so that the next record stays whole (and the torn one is skipped by readers)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class RunLog:
    """Console lines and out_dir/metrics.jsonl (appended, never truncated), plus wandb when asked, from rank 0 only."""

    def __init__(self, out_dir, active, wandb_settings=None):
        self.active, self.fd, self.wandb = active, None, None
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if not active:
            return
        os.makedirs(out_dir, exist_ok=True)
        torn = ends_inside_a_line(self.path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # unbuffered: a failed write is known at once
        if torn:
            os.write(self.fd, b"\n")
            print(f"{self.path} ends in a record a crash cut short: the next one starts on a line of its own", file=sys.stderr)
        if wandb_settings is not None:
            import wandb
            self.wandb = wandb
            wandb.init(**wandb_settings)

    def print(self, text):
        if self.active:
            print(text, flush=True)

    def metrics(self, record):
        if not self.active:
            return
        # strict JSON: an overflowing float16 step has an inf gradient norm, written as null, not Infinity
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        size = os.fstat(self.fd).st_size
        try:
            if os.write(self.fd, line) != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:  # a full disk: one line saying so, and no torn last record
            os.ftruncate(self.fd, size)
            raise unwritable(self.path, e, len(line)) from None
        if self.wandb is not None:
            self.wandb.log(record, step=record["iter"])

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
