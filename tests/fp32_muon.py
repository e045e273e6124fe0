"""train.py with Muon's Newton-Schulz iteration in float32 (torch.optim.Muon runs it in bfloat16).

A test harness, not a test: `torchrun ... tests/fp32_muon.py ARGS` trains like `train.py ARGS`. In
bfloat16 the iteration rounds each update to 8 bits of mantissa, so the last-bit differences between
an all-reduced and an accumulated gradient flip roundings and grow over steps; in float32 one process
and two must agree to float32 noise, which a test can bound without guessing bf16's."""

import os
import sys

import torch
import torch.optim._muon as muon_impl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def newton_schulz_fp32(grad, ns_coefficients, ns_steps, eps):
    """torch.optim._muon._zeropower_via_newtonschulz (the same quintic iteration), in float32."""
    a, b, c = ns_coefficients
    x = grad.float()
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def patch():
    muon_impl._zeropower_via_newtonschulz = newton_schulz_fp32


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    patch()
    import train
    train.main(sys.argv[1:])
