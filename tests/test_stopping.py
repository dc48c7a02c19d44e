"""
stopping.py: each stop signal (SIGTERM, SIGINT, SIGUSR1) asks for a stop and lets the process run on to its
next safe point, in this process with the handlers StopRequest installs; under torchrun a repeated signal is
the same request. One train.py run on Ctrl-C's SIGINT ends with a checkpoint and STOPPED_EXIT.
"""

import os
import signal
from types import SimpleNamespace

import pytest

import stopping
from stopping import StopRequest, check_stop, STOPPED_EXIT
from helpers import load_saved, start_run, stop_after, tiny_run_args

SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]  # what the README promises: scancel/kill, Ctrl-C, SLURM


@pytest.fixture()
def stop_request(monkeypatch):
    """StopRequest installed in this process (alone, not under torchrun), the previous handlers back afterwards."""
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum in SIGNALS:  # a signal install() leaves out is then ignored: a failed assertion, not a killed pytest
        signal.signal(signum, signal.SIG_IGN)
    for name in ("requested", "under_torchrun", "handled_at"):
        monkeypatch.setattr(StopRequest, name, getattr(StopRequest, name))
    StopRequest.install(under_torchrun=False)
    yield StopRequest
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_each_stop_signal_asks_for_a_stop(stop_request, capfd, signum):
    assert not stop_request.requested and not check_stop(SimpleNamespace(distributed=False), "cpu")
    os.kill(os.getpid(), signum)  # the handler runs in this (main) thread before the next bytecode
    assert stop_request.requested and check_stop(SimpleNamespace(distributed=False), "cpu")
    assert f"{signal.Signals(signum).name} received: will save a checkpoint" in capfd.readouterr().err


def test_the_stop_signals_are_exactly_these():
    assert set(stopping.STOP_SIGNALS) == set(SIGNALS)


def test_under_torchrun_a_second_signal_is_the_same_request(stop_request, capfd, monkeypatch):
    """torchrun forwards Ctrl-C to workers that got it already: the second one must not exit without a checkpoint
    (alone, it would: os._exit, which this process cannot survive to test)."""
    monkeypatch.setattr(StopRequest, "under_torchrun", True)
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)  # still here
    assert stop_request.requested
    assert capfd.readouterr().err.count("received") == 1


def test_ctrl_c_stops_train_py_with_a_checkpoint(data_root, tmp_path):
    """SIGINT (Ctrl-C) to a running train.py: a checkpoint of the step it stopped at, and the exit status that says
    'stopped, resume me'. The other signals take the same handler (tested above, in-process)."""
    out = str(tmp_path / "run")
    proc = start_run(tiny_run_args(data_root, out, "--max_iters=1000", "--eval_interval=1000"))
    stdout, stderr = stop_after(proc, "iter 3:", signal.SIGINT)
    assert proc.returncode == STOPPED_EXIT, stderr
    assert "SIGINT received" in stderr and "KeyboardInterrupt" not in stderr
    checkpoint = load_saved(out, "ckpt.pt")
    assert 4 <= checkpoint["iter_num"] < 1000 and checkpoint["evaluated"] is False
    assert f"checkpoint saved to {os.path.join(out, 'ckpt.pt')}" in stdout
