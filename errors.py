"""
A mistake the user can fix (UserError; ConfigError for what does not fit the model) and how every script
reports it: one line on stderr, exit status 1, printed once under torchrun. The bottom of the import graph:
every other module may import it.
"""

import os
import sys
from collections.abc import Callable

import torch


class UserError(Exception):
    """A mistake the user can fix: reported as one line on stderr, no traceback, exit code 1."""


class ConfigError(ValueError):
    """A setting, shape or checkpoint that does not fit the model (model.py, attention.py, generation.py,
    hf_bridge.py): the caller's input, not a bug. Scripts turn it into a UserError's one line; any other
    exception keeps its traceback."""


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's main(), turning a UserError into one clear line and exit status 1, and a status main()
    returns (train.py's 75 for a run stopped on request) into the process's exit status."""
    try:
        status = main()
    except UserError as e:
        message = f"error: {e}"
        if first_to_report(message):
            print(message, file=sys.stderr, flush=True)
        sys.exit(1)
    if status:
        sys.exit(status)


def first_to_report(message: str) -> bool:
    """
    Under torchrun every process usually meets the same mistake (a setting, a file): the first process to
    report a message prints it and the others stay quiet, so 8 GPUs print one line, not 8. torchrun's store,
    served by its agent, counts the reports; a message only one rank meets is still printed. Run alone,
    or with no agent store to ask, every message is printed.
    """
    if "RANK" not in os.environ or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return True
    import hashlib
    from datetime import timedelta
    try:
        store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                           is_master=False, timeout=timedelta(seconds=10))
        return store.add(f"user_error/{hashlib.sha256(message.encode()).hexdigest()}", 1) == 1
    except (RuntimeError, OSError, ValueError, KeyError):  # no store to ask: better twice than never
        return True


def range_check(values: dict) -> Callable[[bool, str, str], None]:
    """need(ok, key, rule): unless ok, a UserError that names --key, its value in `values` and the rule."""
    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise UserError(f"--{key}={values[key]!r} is out of range: {rule}")
    return need
