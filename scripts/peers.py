"""Independent implementations of HC / mHC wired into hcgpt's GPT, for scripts/bench.py --peers.

Each peer sits behind hc.Connection's interface, forward(h, branch) on (B, T, n, C) streams, and
``wire(model, peer)`` swaps every Block's two connections for it, so plain, hcgpt and the peers time
the same model (embedding, blocks, readout, optimizer). The peers keep their own parameters, init
and precision; docs/peers.md maps their parameters onto hcgpt's and lists the differences. Training
never imports this file: the peers are test and benchmark dependencies (requirements-test.txt).

  liger mHC        Liger-Kernel's LigerMHC (liger-kernel 0.8.5): Triton kernels for the coefficients
                   (matmul + RMS, Sinkhorn), the pre-mix and post + residual, called through
                   liger_mhc_forward with the block's branch as the wrapped layer
  lucidrains HC    hyper-connections 0.4.11: HyperConnections (pure torch)
  lucidrains mHC   hyper-connections 0.4.11: ManifoldConstrainedHyperConnections (pure torch)
"""

import importlib.util

import torch

import hc

# peer row name -> (the module it needs, the hcgpt scheme it stands beside, pip requirement)
PEERS = {
    "liger mHC": ("liger_kernel", "mhc", "liger-kernel==0.8.5"),
    "lucidrains HC": ("hyper_connections", "hc", "hyper-connections==0.4.11 einops"),
    "lucidrains mHC": ("hyper_connections", "mhc", "hyper-connections==0.4.11 einops"),
}


def missing(peer):
    """None if the peer's package imports here, else what to install."""
    module, _, requirement = PEERS[peer]
    return None if importlib.util.find_spec(module) else f"not installed (pip install {requirement})"


class LucidrainsConnection(hc.Connection):
    """lucidrains' HyperConnections or ManifoldConstrainedHyperConnections, called as its README's
    ``branch_input, add_residual = hyper_conn(residual)``. The package folds the streams into the batch,
    (B n, T, C), b-major; the model's (B, T, n, C) streams are kept as a transposed view of that layout,
    so no call copies them (the first one materialises the expanded embedding, as the package's own
    expand_stream does)."""

    def __init__(self, mhc, dim, n_streams, layer_idx, sinkhorn_iters):
        super().__init__(dim, n_streams, layer_idx, fused="off", identity_res=False)
        from hyper_connections import HyperConnections, ManifoldConstrainedHyperConnections
        # layer_index: the home stream (layer_index mod n), as hcgpt's layer_idx
        if mhc:
            self.peer = ManifoldConstrainedHyperConnections(n_streams, dim=dim, layer_index=layer_idx,
                                                            sinkhorn_iters=sinkhorn_iters)
        else:
            self.peer = HyperConnections(n_streams, dim=dim, layer_index=layer_idx)

    def forward(self, h, branch):
        self.check(h)
        B, T, n, C = h.shape
        branch_input, add_residual = self.peer(h.transpose(1, 2).reshape(B * n, T, C))
        return add_residual(branch(branch_input)).reshape(B, n, T, C).transpose(1, 2)

    def decay_parameters(self):   # the published code's optimizers decay every parameter with dim >= 2
        return [p for p in self.peer.parameters() if p.dim() >= 2]


class LigerConnection(hc.Connection):
    """Liger-Kernel's LigerMHC: its parameters, init and settings, and its forward through Liger's own
    liger_mhc_forward (coefficients, pre-mix, the layer, post + residual) with the block's branch as
    the layer. Liger takes bf16 / fp16 streams, fp32 only with allow_fp32; φ is kept in the streams'
    dtype (its docs: bf16 φ for bf16 streams, for the tensor cores)."""

    def __init__(self, dim, n_streams, layer_idx, stream_dtype, sinkhorn_iters):
        super().__init__(dim, n_streams, layer_idx, fused="off", identity_res=False)
        from liger_kernel.transformers import LigerMHC
        from liger_kernel.transformers.functional import liger_mhc_forward
        self.peer = LigerMHC(torch.nn.Identity(), hc=n_streams, c=dim, tmax=sinkhorn_iters, phi_dtype=stream_dtype,
                             allow_fp32=stream_dtype == torch.float32)
        self.liger_mhc_forward = liger_mhc_forward   # bound here: no import inside a compiled forward

    def forward(self, h, branch):
        self.check(h)
        m = self.peer
        return self.liger_mhc_forward(h, branch, m.phi, m.b, m.alpha_pre, m.alpha_post, m.alpha_res,
                                      allow_fp32=m.allow_fp32, tmax=m.tmax, rms_eps=m.rms_eps, pre_eps=m.pre_eps,
                                      sinkhorn_eps=m.sinkhorn_eps, post_mult=m.post_mult)

    def decay_parameters(self):
        return [self.peer.phi]


def wire(model, peer):
    """Swap every Block's hc_attn / hc_mlp of a GPT (built with n_streams > 1) for ``peer``'s connection,
    on the model's device; the mHC peers run the model's sinkhorn_iters iterations. Returns the model."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; choose one of {sorted(PEERS)}")
    n = model.config.n_streams
    if n < 2:
        raise ValueError(f"the peers are n-stream connections: build the GPT with n_streams >= 2, got {n}")
    if peer == "liger mHC" and n & (n - 1):
        raise ValueError(f"Liger's mHC kernels take n_streams a power of 2 (tl.arange over the streams), got {n}")
    device, sinkhorn_iters = next(model.parameters()).device, model.config.sinkhorn_iters
    for block in model.transformer.h:
        for name in ("hc_attn", "hc_mlp"):
            old = getattr(block, name)
            if peer == "liger mHC":
                new = LigerConnection(old.dim, old.n, old.layer_idx, model.stream_dtype, sinkhorn_iters)
            else:
                new = LucidrainsConnection(peer == "lucidrains mHC", old.dim, old.n, old.layer_idx, sinkhorn_iters)
            setattr(block, name, new.to(device))
    return model
