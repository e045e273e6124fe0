"""The published mHC-lite grid's model: readout, static weight decay, Sinkhorn orientation, stream
precision (each against an independent derivation written here), the grid configs through
train.py, and the sweep presets."""

import glob
import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # before Triton's first import (as in test_kernels.py), for the fused Sinkhorn in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import config
import configurator
import hc
import numerics
import optim
import train
from conftest import read_log, tiny_args
from model import GPT, GPTConfig
from errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "*_[sml].py"))
              if os.path.basename(p)[:3] in ("owt", "fwe"))


C = 24  # tiny()'s width


def tiny(**kw):
    cfg = dict(block_size=16, vocab_size=96, n_layer=2, n_head=2, n_embd=24, dropout=0.0, bias=True)
    cfg.update(kw)
    return GPTConfig(**cfg)


def perturb(model, seed=0):
    """Non-trivial norms, biases and streams: every parameter moved off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def layer_norm64(x, w, b):
    x, w = x.double(), w.double()
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * w
    return y if b is None else y + b.double()


def final_streams(model, idx):
    """(logits, the streams (B, T, n, C) that leave the last block)."""
    out = []
    hook = model.transformer.h[-1].register_forward_hook(lambda m, a, o: out.append(o))
    logits, _ = model(idx)
    hook.remove()
    return logits, out[0]


# ----------------------------------------------------------------------------------------
# readout

@pytest.mark.numerics
@pytest.mark.parametrize("scheme,n", [("kromhc", 4), ("hc", 3), ("mhc", 2)])
def test_readout_norm_sum_and_mean(scheme, n):
    """norm_sum: Σ_i LN(h_i) W_outᵀ; mean: LN(mean_i h_i) W_outᵀ, from the final streams."""
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    for readout in ("norm_sum", "mean"):
        torch.manual_seed(0)
        model = perturb(GPT(tiny(scheme=scheme, n_streams=n, readout=readout)))
        logits, h = final_streams(model, idx)
        ln = model.transformer.ln_f
        x = layer_norm64(h, ln.weight, ln.bias).sum(-2) if readout == "norm_sum" else \
            layer_norm64(h.double().mean(-2), ln.weight, ln.bias)
        expected = x @ model.lm_head.weight.double().T
        # fp32 against float64 from the same streams: the norm's mean and variance over C, the sum (mean) over
        # n, the unembedding over C
        numerics.assert_close(logits, expected, numerics.chain(C, C, n, C), readout)


def test_readout_plain_identical():
    idx = torch.randint(0, 96, (2, 16))
    out = {}
    for readout in ("mean", "norm_sum"):
        torch.manual_seed(0)
        out[readout] = perturb(GPT(tiny(readout=readout)))(idx, idx)
    assert torch.equal(out["mean"][0], out["norm_sum"][0]) and torch.equal(out["mean"][1], out["norm_sum"][1])


@pytest.mark.numerics
def test_readout_identical_streams_scale_logits_by_n():
    """With zero branch outputs the n streams stay n copies of the embedding (H_res is doubly
    stochastic), so norm_sum = n x mean exactly: why the published readout starts from logits about
    n times larger (and a different loss at init)."""
    n, idx = 4, torch.randint(0, 96, (2, 16))
    out = {}
    for readout in ("mean", "norm_sum"):
        torch.manual_seed(0)
        model = perturb(GPT(tiny(scheme="kromhc", n_streams=n, bias=False, readout=readout)))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("c_proj.weight"):
                    p.zero_()
        out[readout] = model(idx, idx)
    (lm, loss_m), (ls, loss_s) = out["mean"], out["norm_sum"]
    # "n copies" up to rounding: each H_res's rows sum to 1 but for its softmaxes' and mixes' rounding, and the
    # mix sums over n (4 connections; the norm undoes a common scale of a stream); then the readout's sum
    # (mean) over n, the norm over C and the unembedding over C
    rel = 4 * numerics.chain(*numerics.res_widths("kromhc", n), n) + numerics.chain(n, C, C, C)
    numerics.assert_close(ls, n * lm, rel, "norm_sum logits")
    # the loss moves by at most 2 max |logit difference|, and rounds its softmax over the vocabulary and mean
    # over the 32 tokens
    loss_n = F.cross_entropy(n * lm.flatten(0, 1), idx.flatten())
    numerics.assert_close(loss_s, loss_n, 1.0, "loss",
                          scale=2 * rel * ls.abs().max().item() + numerics.chain(96, 32) * loss_n.item())
    assert not torch.allclose(loss_s, loss_m, atol=1e-3)


def test_readout_bad_value():
    with pytest.raises(ValueError, match="readout"):
        GPT(tiny(readout="sum"))


# ----------------------------------------------------------------------------------------
# weight decay of the static coefficients

# The published code's parameters of one connection and their shapes (n streams, C channels); its
# optimizer decays exactly those with dim >= 2. Each hcgpt parameter is listed with the one it
# is part of: the decayed statics under decay_static are those whose published parameter is 2-D.
PUBLISHED = {
    "hc": {"A_m": ("static_alpha", 2), "A_r": ("static_alpha", 2), "B": ("static_beta", 1)},
    "mhc": {"b_pre": ("static_alpha", 2), "b_res": ("static_alpha", 2), "b_post": ("static_beta", 1)},
    "mhc_lite": {"b_pre": ("static_alpha", 1), "b_res": ("static_alpha", 1), "b_post": ("static_beta", 1)},
    "kromhc": {"b_pre": ("static_alpha", 1), "b_res": ("static_alpha", 1), "b_post": ("static_beta", 1)},
}
DYNAMIC = {"hc": {"W_m", "W_r", "W_beta"}, "mhc": {"phi"}, "mhc_lite": {"phi"}, "kromhc": {"phi"}}


@pytest.mark.parametrize("scheme", ["plain", "hc", "mhc", "mhc_lite", "kromhc"])
@pytest.mark.parametrize("decay_static", [False, True])
def test_static_decay_groups(scheme, decay_static):
    n = 1 if scheme == "plain" else 4
    model = GPT(tiny(scheme=scheme, n_streams=n, decay_static=decay_static, bias=False))
    opt = optim.build(model, optim.OptimConfig(weight_decay=0.1, learning_rate=1e-3, beta1=0.9, beta2=0.95), "cpu")
    names = {id(p): name for name, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert not decay & no_decay and decay | no_decay == set(names.values())
    expected = {"transformer.wte.weight", "transformer.wpe.weight"}  # lm_head is tied to wte
    expected |= {f"transformer.h.{i}.{m}.weight" for i in range(2)
                 for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    if scheme != "plain":
        statics = {k for k, (_, dim) in PUBLISHED[scheme].items() if dim >= 2} if decay_static else set()
        expected |= {f"transformer.h.{i}.{c}.{k}" for i in range(2) for c in ("hc_attn", "hc_mlp")
                     for k in DYNAMIC[scheme] | statics}
    assert decay == expected


@pytest.mark.numerics
def test_static_decay_step_shrinks_exactly_the_decayed():
    """One AdamW step on zero gradients moves only the decayed parameters, by the factor 1 - lr wd."""
    lr, wd = 0.1, 0.5
    model = GPT(tiny(scheme="mhc", n_streams=3, decay_static=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = optim.build(model, optim.OptimConfig(weight_decay=wd, learning_rate=lr, beta1=0.9, beta2=0.95), "cpu")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = model.state_dict()
    for k in ("transformer.h.0.hc_attn.b_pre", "transformer.h.1.hc_mlp.b_res", "transformer.h.0.hc_mlp.phi"):
        # one product with 1 - lr wd each side (and that factor's rounding to fp32 on one side, perhaps)
        numerics.assert_close(after[k], before[k] * (1 - lr * wd), 3 * numerics.u(), k)
    assert before["transformer.h.1.hc_mlp.b_res"].min() == -8.0  # something to shrink
    for k in ("transformer.h.0.hc_attn.b_post", "transformer.h.0.hc_attn.alpha_res", "transformer.h.0.hc_attn.gamma",
              "transformer.ln_f.weight"):
        assert torch.equal(after[k], before[k]), k


# ----------------------------------------------------------------------------------------
# Sinkhorn orientation

def published_sinkhorn64(H_logits, iters):
    """The published mhc.py, in float64: it holds alpha[in, out] = H_logitsᵀ and iterates
    alpha -= logsumexp over dim -2, then over dim -1; H[out, in] is the result transposed."""
    a = H_logits.double().transpose(-1, -2)
    for _ in range(iters):
        a = a - torch.logsumexp(a, dim=-2, keepdim=True)
        a = a - torch.logsumexp(a, dim=-1, keepdim=True)
    return a.exp().transpose(-1, -2)


def eq9_sinkhorn64(H_logits, iters):
    """mHC Eq. 9 on H[out, in]: normalise columns, then rows (ends with rows exact)."""
    L = H_logits.double()
    for _ in range(iters):
        L = L - torch.logsumexp(L, dim=-2, keepdim=True)
        L = L - torch.logsumexp(L, dim=-1, keepdim=True)
    return L.exp()


@pytest.mark.numerics
@pytest.mark.parametrize("n", [2, 4, 5])
def test_sinkhorn_cols_is_the_published_order(n):
    z = 3 * torch.randn(6, n, n, generator=torch.Generator().manual_seed(n), requires_grad=True)
    g = torch.randn(6, n, n, generator=torch.Generator().manual_seed(7))
    for end, ref in (("cols", published_sinkhorn64), ("rows", eq9_sinkhorn64)):
        H = hc.sinkhorn(z, 3, end)
        z64 = z.detach().double().requires_grad_()
        H64 = ref(z64, 3)
        # fp32 against float64: Sinkhorn's 3 iterations, forward, and back for the gradient
        top = z.abs().max().item()
        numerics.assert_close(H, H64, numerics.sinkhorn_path(n, 3, top), f"{end}: H")
        (gz,) = torch.autograd.grad((H * g).sum(), z)
        (gz64,) = torch.autograd.grad((H64 * g.double()).sum(), z64)
        numerics.assert_close(gz, gz64, numerics.sinkhorn_path(n, 3, top, backward=True), f"{end}: gradient")
        # which side is exact: the last normalisation's (but for its sum's rounding and this sum's, over n);
        # the other carries the error of 3 iterations
        exact, loose = (-2, -1) if end == "cols" else (-1, -2)
        assert (H.sum(exact) - 1).abs().max() <= numerics.chain(n, n)
        assert (H.sum(loose) - 1).abs().max() > 1e-3


@pytest.mark.numerics
def test_mhc_connection_sinkhorn_end():
    """mHC with sinkhorn_end='cols': H_res is the published Sinkhorn of b_res (φ = 0), and the
    forward mix carries its row error: an output stream is not an exact convex combination."""
    n, C = 4, 8
    g = torch.Generator().manual_seed(0)
    b_res = 2 * torch.randn(n * n, generator=g)
    h = torch.randn(2, 3, n, C, generator=g)
    for end, ref in (("cols", published_sinkhorn64), ("rows", eq9_sinkhorn64)):
        conn = hc.make_connection("mhc", C, n, 1, sinkhorn_iters=2, sinkhorn_end=end)
        with torch.no_grad():
            conn.b_res.copy_(b_res)
            conn.b_post.fill_(-30.0)  # H_post ~ 0: the output is the residual mix alone
        H = ref(b_res.view(n, n), 2)
        # phi = 0: the logits are b_res exactly; fp32 against float64 is Sinkhorn's rounding (2 iterations)
        rel = numerics.sinkhorn_path(n, 2, b_res.abs().max().item())
        numerics.assert_close(conn.coefficients(h)[2][0, 0], H, rel, f"{end}: H_res")
        out = conn(h, lambda x: torch.ones_like(x))
        # and the mix over n (H_post y = 2 sigmoid(-30) = 2e-13 is far below it)
        numerics.assert_close(out, torch.einsum("ij,btjc->btic", H, h.double()), rel + numerics.chain(n),
                              f"{end}: output")
        ones = conn(torch.ones(1, 1, n, C), lambda x: torch.zeros_like(x))[0, 0, :, 0]  # row sums of H_res
        assert ((ones - 1).abs().max() > 1e-3) == (end == "cols")


def test_sinkhorn_end_option_checks():
    assert hc.SchemeConfig.sinkhorn_end == "rows"
    assert hc.make_connection("mhc", 8, 2, 0).sinkhorn_end == "rows"
    with pytest.raises(ConfigError, match="config key 'sinkhorn_end' must be one of"):
        hc.make_connection("mhc", 8, 2, 0, sinkhorn_end="columns")
    hc.make_connection("kromhc", 8, 4, 0, sinkhorn_end="cols")  # an option other schemes ignore


@pytest.mark.numerics
def test_sinkhorn_cols_fused_matches_torch(monkeypatch):
    """The fused Sinkhorn kernel runs the 'cols' orientation too (Triton's interpreter on CPU)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    z = 3 * torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(3))
    z = z.to(device).requires_grad_()
    H_torch = hc.sinkhorn(z, 4, "cols", fused="off")
    (g_torch,) = torch.autograd.grad(H_torch.square().sum(), z)
    H_fused = hc.sinkhorn(z, 4, "cols", fused="on")
    (g_fused,) = torch.autograd.grad(H_fused.square().sum(), z)
    # Sinkhorn's 4 iterations over n = 4, forward and (for the gradient) back: in two fp32 orders, and against
    # float64
    top = z.abs().max().item()
    rel_H, rel_g = numerics.sinkhorn_path(4, 4, top), numerics.sinkhorn_path(4, 4, top, backward=True)
    numerics.assert_close(H_fused, H_torch, rel_H, "H, fused against torch")
    numerics.assert_close(g_fused, g_torch, rel_g, "gradient, fused against torch")
    numerics.assert_close(H_fused.cpu(), published_sinkhorn64(z.detach().cpu(), 4), rel_H, "H against float64")


# ----------------------------------------------------------------------------------------
# stream precision

@pytest.mark.parametrize("scheme,n", [("plain", 1), ("kromhc", 4), ("mhc", 2)])
def test_stream_dtype_bfloat16_hc(scheme, n):
    """bfloat16_hc: bf16 streams into and out of every block for n > 1, fp32 for plain; the same
    model as stream_dtype='bfloat16' (n > 1) or 'float32' (plain), bit for bit."""
    idx = torch.randint(0, 96, (2, 16))
    seen, out = [], {}
    for dtype in ("bfloat16_hc", "bfloat16" if n > 1 else "float32"):
        torch.manual_seed(0)
        model = GPT(tiny(scheme=scheme, n_streams=n, stream_dtype=dtype))
        if dtype == "bfloat16_hc":
            for block in model.transformer.h:
                block.register_forward_hook(lambda m, a, o: seen.extend([a[0].dtype, o.dtype]))
        out[dtype] = model(idx, idx)
    want = torch.bfloat16 if n > 1 else torch.float32
    assert seen == [want] * 4
    a, b = out.values()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------------------
# the grid configs through train.py

def test_grid_configs_set_the_published_model():
    assert len(GRID) == 6, GRID
    for path in GRID:
        cfg = configurator.load(config.KEYS, [path])
        assert (cfg["readout"], cfg["bias"], cfg["decay_static"], cfg["sinkhorn_end"], cfg["stream_dtype"]) == \
            ("norm_sum", False, True, "cols", "bfloat16_hc"), path
    assert config.DEFAULTS["readout"] == "mean" and config.DEFAULTS["decay_static"] is False
    assert config.DEFAULTS["sinkhorn_end"] == "rows" and config.DEFAULTS["stream_dtype"] == "float32"


@pytest.mark.parametrize("config", GRID)
def test_grid_config_trains(config, data_dir, tmp_path):
    """Each grid config builds its model and trains a few steps at tiny overrides (mhc: every
    grid option active; plain for one config: the reference's plain nanoGPT, fp32 residual)."""
    scheme = "plain" if config.endswith("owt_s.py") else "mhc"
    out = tmp_path / "run"
    args = [config, *tiny_args(data_dir, out, f"--scheme={scheme}", "--max_iters=4", "--eval_interval=4",
                               "--wandb_log=False")]
    result = train.main(args)
    log = read_log(out)
    assert log[0]["readout"] == "norm_sum" and log[0]["bias"] is False and log[0]["sinkhorn_end"] == "cols"
    trains = [r["loss"] for r in log if r["type"] == "train"]
    assert len(trains) == 4 and all(math.isfinite(x) for x in trains) and trains[-1] < trains[0]
    assert result["step"] == 4 and math.isfinite(result["val_loss"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert not any(k.endswith(".bias") for k in ckpt["model"])
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    assert model.stream_dtype == (torch.float32 if scheme == "plain" else torch.bfloat16)
    if scheme == "mhc":  # decay_static reached the optimizer: its decayed group holds the 2-D statics
        # (the decay's arithmetic is test_static_decay_step_shrinks_exactly_the_decayed; after a few Adam
        # steps the statics' values depend on the sign of gradients near 1e-6, so they are not asserted)
        groups = ckpt["optimizer"]["param_groups"]
        adamw = optim.OptimConfig(weight_decay=0.1, learning_rate=1e-3, beta1=0.9, beta2=0.95)
        decayed = [len(optim.build(GPT(GPTConfig(**{**ckpt["model_config"], "decay_static": d})), adamw, "cpu")
                       .param_groups[0]["params"]) for d in (False, True)]
        assert groups[0]["weight_decay"] > 0 and len(groups[0]["params"]) == decayed[1] > decayed[0]


def test_train_rejects_bad_grid_keys(data_dir, tmp_path):
    for arg, msg in (("--readout=sum", "'readout' must be one of"), ("--sinkhorn_end=row", "'sinkhorn_end' must be"),
                     ("--stream_dtype=bf16", "'stream_dtype' must be one of")):
        with pytest.raises(ConfigError, match=msg):
            train.main(tiny_args(data_dir, tmp_path / "x", arg))


# ----------------------------------------------------------------------------------------
# sweep presets

@pytest.mark.numerics
def test_sweep_presets(capsys):
    from scripts import sweep
    assert sweep.main(["--preset", "kromhc_n", "--configs", "configs/owt_m.py"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("--n_streams=")[1].split()[0] for line in lines] == ["4", "8", "16"]
    assert all("--scheme=kromhc" in line for line in lines)
    for n in (8, 16):  # KromHC builds at n = 8, 16 from factors of 2
        conn = hc.make_connection("kromhc", 8, n, 0)
        assert conn.factors == (2,) * int(math.log2(n))
        H = conn.coefficients(torch.randn(1, 2, n, 8))[2]
        p = torch.sigmoid(torch.tensor(8.0, dtype=torch.float64))  # softmax([0, -8])[0]: the identity's weight
        U, expected = torch.stack([torch.stack([p, 1 - p]), torch.stack([1 - p, p])]), torch.ones(1, 1, dtype=torch.float64)
        for _ in conn.factors:
            expected = torch.kron(expected, U)
        # phi = 0: fp32 against float64 is each factor's softmax and mix over 2, multiplied together
        numerics.assert_close(H[0, 0], expected, numerics.chain(*numerics.res_widths("kromhc", n)), f"H_res at n={n}")
    assert sweep.main(["--preset", "schemes", "--n", "4", "8", "--configs", "configs/fwe_s.py", "--nproc", "0"]) == 0
    cap = capsys.readouterr()
    runs = [(line.split("--scheme=")[1].split()[0], line.split("--n_streams=")[1].split()[0]) for line in cap.out.splitlines()]
    assert runs == [("plain", "1"), ("hc", "4"), ("hc", "8"), ("mhc", "4"), ("mhc", "8"), ("mhc_lite", "4"),
                    ("kromhc", "4"), ("kromhc", "8"), ("mhc_v4", "4"), ("mhc_v4", "8")]
    assert "leaving out mhc_lite at n=8" in cap.err and cap.err.count("leaving out") == 1
    with pytest.raises(SystemExit):
        sweep.main(["--schemes", "kromhc", "--n", "7", "--configs", "configs/fwe_s.py"])
    assert "kron_factors" in capsys.readouterr().err
