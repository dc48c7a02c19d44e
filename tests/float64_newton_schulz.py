"""
Runs train.py (arguments as given) with torch.optim.Muon's bfloat16 Newton-Schulz iteration replaced by the
same quintic iteration in float64. The DDP/FSDP tests run Muon both ways: how far two ranks are from one
process with float64 is the distribution's own error; the rest of the bfloat16 difference is the iteration's
rounding of inputs that differ by the order of gradient summation. Imported, it only offers the iteration
(use_float64_newton_schulz), for tests/muon_fsdp_worker.py and its one-process reference.
"""

import os
import sys
import runpy

import torch.optim._muon as torch_muon


def float64_newton_schulz(grad, coefficients, steps, eps):
    a, b, c = coefficients
    X = grad.double()
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).to(grad.dtype)


def use_float64_newton_schulz():
    """torch.optim.Muon's iteration, and so optimizers.Muon's, in float64 from now on in this process."""
    torch_muon._zeropower_via_newtonschulz = float64_newton_schulz


if __name__ == "__main__":
    use_float64_newton_schulz()
    from helpers import REPO  # noqa: E402  (it puts the repository on sys.path)
    sys.argv = [os.path.join(REPO, "train.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
