"""recompute: every mode gives the gradients of "none" for every scheme and both architectures; "streams"
(the mHC paper's stream recompute) groups the blocks by the paper's L_r rule, recomputes no matmul, keeps
no stream inside a group, and compiles; bf16 streams never keep an fp32 copy beside the bf16 one.

Recompute replays the same ops on the same inputs in backward, and the CPU kernels are deterministic, so
the gradients are compared for equality (a recompute that changed what is computed, e.g. a dropout mask
or a coefficient from other streams, shows as a difference)."""

import pytest
import torch

import numerics
from torch.utils.flop_counter import FlopCounterMode

from model import GPT, GPTConfig, RECOMPUTE

SCHEMES = ["plain", "hc", "mhc", "mhc_lite", "kromhc", "mhc_v4"]


def tiny(arch, scheme, recompute, **kw):
    extra = dict(bias=False) if arch == "nanochat" else dict(dropout=0.1)   # dropout: the masks must be replayed
    return GPTConfig(arch=arch, n_layer=4, n_head=2, n_embd=32, block_size=16, vocab_size=64, scheme=scheme,
                     fused="off", recompute=recompute, **extra, **kw)


def step(cfg):
    """(loss, {name: grad}) of one forward + backward from a fixed init and batch."""
    torch.manual_seed(0)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(64, (2, 16), generator=g), torch.randint(64, (2, 16), generator=g)
    torch.manual_seed(2)   # dropout
    _, loss = model(x, y)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt2", "nanochat"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_mode_gives_the_gradients_of_none(arch, scheme):
    loss, grads = step(tiny(arch, scheme, "none"))
    for mode in RECOMPUTE[1:]:
        for group in ((0, 3) if mode == "streams" else (0,)):   # 3: a last group shorter than the others
            other_loss, other = step(tiny(arch, scheme, mode, recompute_group=group))
            assert other_loss == loss, (mode, group)
            assert other.keys() == grads.keys()
            for name, grad in grads.items():
                assert torch.equal(other[name], grad), (mode, group, name)


@pytest.mark.parametrize("scheme", ["hc", "kromhc", "mhc_v4"])
def test_bf16_streams_same_gradients_in_every_mode(scheme):
    loss, grads = step(tiny("gpt2", scheme, "none", stream_dtype="bfloat16"))
    for mode in RECOMPUTE[1:]:
        other_loss, other = step(tiny("gpt2", scheme, mode, stream_dtype="bfloat16", recompute_group=2))
        assert other_loss == loss and all(torch.equal(other[n], g) for n, g in grads.items()), mode


def test_group_size_is_the_papers_rule():
    """L_r = sqrt(n L / (n + 2)) (mHC Eq. 20), rounded, within [1, L]; recompute_group overrides it."""
    def group(n_layer, scheme="kromhc", n=4, **kw):
        return GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=16, block_size=8, vocab_size=64, scheme=scheme,
                             n_streams=n, recompute="streams", **kw)).recompute_group()
    assert group(12) == 3                      # sqrt(48 / 6) = 2.83
    assert group(24) == 4                      # sqrt(96 / 6) = 4
    assert group(12, "plain", 1) == 2          # sqrt(12 / 3)
    assert group(1) == 1 and group(2) == 1     # sqrt(8 / 6) = 1.15
    assert group(12, recompute_group=5) == 5


def test_streams_recomputes_no_matmul():
    """The extra FLOPs of "streams" over "none" (FlopCounterMode counts matmuls and attention): none; "blocks"
    spends one more forward."""
    def flops(mode):
        torch.manual_seed(0)
        model = GPT(tiny("gpt2", "kromhc", mode, recompute_group=2))
        x = torch.randint(64, (2, 16))
        with FlopCounterMode(display=False) as counter:
            model(x, x)[1].backward()
        return counter.get_total_flops()
    none, streams, blocks = flops("none"), flops("streams"), flops("blocks")
    assert streams == none
    assert blocks > none


def test_streams_keeps_no_stream_inside_a_group():
    """What autograd saves outside the selective-checkpoint cache: with "streams" only each group's input streams
    (B, T, n, C) are saved as streams; with "none" every sublayer's are."""
    def stream_saves(mode, group=0):
        torch.manual_seed(0)
        model = GPT(tiny("gpt2", "kromhc", mode, recompute_group=group))
        x = torch.randint(64, (2, 16))
        seen = set()

        def pack(t):
            if t.dim() == 4 and tuple(t.shape[-2:]) == (4, 32):
                seen.add(t.untyped_storage().data_ptr())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, x)[1]
        loss.backward()
        return len(seen)
    assert stream_saves("streams", group=2) == 2     # 4 layers, groups of 2: the two groups' inputs
    assert stream_saves("streams", group=4) == 1
    assert stream_saves("none") > 4


def test_streams_compiles_and_matches_eager():
    """Under torch.compile (aot_eager: no C++ or GPU needed) the selective checkpoint is traced, not broken."""
    cfg = tiny("gpt2", "kromhc", "streams", recompute_group=2)
    loss, grads = step(cfg)
    torch.manual_seed(0)
    model = GPT(cfg)
    compiled = torch.compile(model, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(64, (2, 16), generator=g), torch.randint(64, (2, 16), generator=g)
    torch.manual_seed(2)
    compiled_loss = compiled(x, y)[1]
    compiled_loss.backward()
    # AOT autograd's decomposed graph against eager: the same reductions, perhaps in other orders; the dropout
    # masks come from the same seed. Each gradient relative to its largest entry (numerics.gpt2_path: forward,
    # backward, and the sum over the tokens).
    kw = dict(n=4, res=numerics.res_widths("kromhc", 4))
    numerics.assert_close(compiled_loss, loss, numerics.gpt2_path(4, 32, 2, 16, 64, 32, backward=False, **kw), "loss")
    rel = numerics.gpt2_path(4, 32, 2, 16, 64, 32, **kw)
    for name, p in model.named_parameters():
        numerics.assert_close(p.grad, grads[name], rel, name)


@pytest.mark.parametrize("scheme", ["hc", "mhc", "kromhc"])
def test_bf16_streams_keep_no_fp32_copy(scheme):
    """With bf16 streams (recompute "none"), autograd keeps the streams in bf16 only: the coefficients' fp32 copy of
    them is recomputed in backward, so bf16 streams never cost more than fp32 ones (2 bytes a value, not 2 + 4)."""
    torch.manual_seed(0)
    model = GPT(tiny("gpt2", scheme, "none", stream_dtype="bfloat16"))
    x = torch.randint(64, (2, 16))
    kept = {}

    def pack(t):
        if t.dim() == 4 and tuple(t.shape[-2:]) == (4, 32):
            kept[t.untyped_storage().data_ptr()] = t.dtype
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, x)[1]
    loss.backward()
    assert kept and set(kept.values()) == {torch.bfloat16}
