"""Val loss and bits per byte over fixed val windows, and the residual diagnostics: the connections'
H_pre / H_post / H_res on a fixed batch, read by hooks on the connections (hc.diagnostics)."""

import math

import torch
import torch.distributed as dist

import hc
from evals import eval_mode


@torch.no_grad()
def val_loss_bpb(model, batches, token_bytes, ctx, device, ddp=False):
    """(val loss, val BPB) over batches of (x, y), summed over ranks. Loss: mean nats per target
    token. BPB = nats / (ln 2 x bytes) over the target tokens that are text: special tokens have
    0 bytes in token_bytes and count in neither sum (as in nanochat)."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, nats of text, bytes
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with ctx:
                _, loss = model(x, y, reduction="none")
            loss = loss.double()
            valid = y >= 0
            nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], 0)
            sums += torch.stack([loss.sum(), valid.sum(), (loss * (nbytes > 0)).sum(), nbytes.sum()])
    if ddp:
        dist.all_reduce(sums)
    nats, count, text_nats, nbytes = sums.tolist()
    return nats / count, text_nats / (math.log(2) * nbytes)


@torch.no_grad()
def residual_diagnostics(raw_model, x, ctx):
    """hc.diagnostics of every connection of the (uncompiled) model on the batch x, with the readout
    weights of each stream (hc.readout_diagnostics) where the model reads out with hc_head."""
    coeffs, readout = [], []
    hooks = [c.register_forward_pre_hook(lambda mod, args: coeffs.append(mod.coefficients(args[0])))
             for c in raw_model.connections()]
    head = getattr(raw_model, "hc_head", None)
    if head is not None:
        hooks.append(head.register_forward_pre_hook(lambda mod, args: readout.append(mod.weights(args[0]))))
    try:
        with eval_mode(raw_model), ctx:
            raw_model(x)
    finally:
        for h in hooks:
            h.remove()
    d = hc.diagnostics(coeffs, raw_model.connection_names())
    for w in readout:
        d["scalars"].update(hc.readout_diagnostics(w))
    return d
