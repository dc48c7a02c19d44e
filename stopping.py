"""
Stop signals: SIGTERM, SIGINT and SIGUSR1 ask a run for a checkpoint at the next safe point (StopRequest),
which every process agrees on (check_stop); a watcher thread exits a process stuck outside Python. A stopped
run exits with STOPPED_EXIT.
"""

import os
import math
import time
import signal
import threading

import torch
import torch.distributed as dist

STOPPED_EXIT = 75  # EX_TEMPFAIL, "try again later": stopped on request with a checkpoint to resume from (0: finished, 1: an error)
STUCK_AFTER = 10  # seconds a stop signal may wait for the main thread before the process exits without a checkpoint
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class StopRequest:
    """
    SIGTERM, SIGINT and SIGUSR1 (SLURM's --signal=USR1@N) ask for a checkpoint at the next safe point: a step
    boundary, between evaluation or HellaSwag batches, or right after a checkpoint being written. Run alone,
    a second signal exits at once. Under torchrun a second one is the same request arriving again (scancel
    or Ctrl-C reach every worker directly and again through the agent), so it is not taken for "exit now":
    torchrun kills what is still running after its grace period anyway.
    """
    requested = False
    under_torchrun = False
    handled_at = -math.inf  # when the handler last ran (time.monotonic): the main thread was running Python code

    @classmethod
    def install(cls, under_torchrun):
        cls.requested, cls.under_torchrun = False, under_torchrun
        for signum in STOP_SIGNALS:
            signal.signal(signum, cls.handle)
        if under_torchrun:
            cls.watch_for_a_blocked_main_thread()

    @classmethod
    def watch_for_a_blocked_main_thread(cls):
        """
        Python runs a signal handler in the main thread, between two bytecodes. A process blocked in a collective
        whose peers are gone (torchrun tearing the group down after a worker died, NCCL, a peer on a lost node)
        never gets there, so it would sit out torchrun's grace period until SIGKILL. The interpreter also writes
        each signal to a wakeup file descriptor at once, from C; a thread reading it exits the process when the
        handler has not run STUCK_AFTER seconds later. A healthy run reaches Python within milliseconds.
        """
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd)

        def watch():
            while True:
                signum = os.read(read_fd, 1)[0]
                arrived = time.monotonic()
                while cls.handled_at < arrived - 1.0:  # 1 s of slack: the handler may have run just before the read
                    if time.monotonic() - arrived > STUCK_AFTER:
                        os.write(2, f"\n{signal.Signals(signum).name}: the training process is blocked outside Python "
                                    f"(a collective whose peers are gone); exiting now\n".encode())
                        os._exit(128 + signum)
                    time.sleep(0.1)
        threading.Thread(target=watch, name="stop-watch", daemon=True).start()

    @classmethod
    def handle(cls, signum, frame):
        # os.write, not print: a handler that prints while the main thread prints can raise "reentrant call"
        name = signal.Signals(signum).name
        cls.handled_at = time.monotonic()
        if cls.requested:
            if cls.under_torchrun:
                return
            os.write(2, f"\nsecond {name}: exiting now without a checkpoint\n".encode())
            os._exit(128 + signum)
        cls.requested = True
        os.write(2, f"\n{name} received: will save a checkpoint and stop at the next step boundary or evaluation batch\n".encode())


def check_stop(processes, device):
    """Whether any process has a stop request. Every process must call it at the same points (it is a collective
    under torchrun), so all of them stop at the same batch."""
    requested = StopRequest.requested
    if processes.distributed:
        flag = torch.tensor([float(requested)], device=device)
        dist.all_reduce(flag)
        requested = flag.item() > 0
    return requested
