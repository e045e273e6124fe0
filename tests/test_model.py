"""model.py: plain == nanoGPT, HC at init == plain, every scheme runs, optimizer groups, FLOPs."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig

SCHEMES_N = [("plain", 1), ("hc", 4), ("mhc", 4), ("mhc_lite", 4), ("kromhc", 4), ("kromhc", 6)]


def tiny(**kw):
    cfg = dict(block_size=16, vocab_size=96, n_layer=2, n_head=2, n_embd=24, dropout=0.0, bias=True)
    cfg.update(kw)
    return GPTConfig(**cfg)


def nanogpt_reference(sd, idx, n_layer, n_head, targets=None):
    """GPT-2 forward written out from nanoGPT's equations (manual masked softmax attention,
    tanh-free exact GELU, tied unembedding), reading weights from a state_dict."""
    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd.get(p + ".bias"), 1e-5)

    def lin(x, p):
        y = x @ sd[p + ".weight"].T
        return y + sd[p + ".bias"] if p + ".bias" in sd else y

    B, T = idx.shape
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    C = x.shape[-1]
    hs = C // n_head
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        q, k, v = lin(ln(x, p + "ln_1"), p + "attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, n_head, hs).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + lin(y, p + "attn.c_proj")
        h = lin(ln(x, p + "ln_2"), p + "mlp.c_fc")
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        x = x + lin(h, p + "mlp.c_proj")
    logits = ln(x, "transformer.ln_f") @ sd["transformer.wte.weight"].T
    loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return logits, loss


def nanogpt_param_shapes(V, T, L, C, bias):
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C), "lm_head.weight": (V, C),
              "transformer.ln_f.weight": (C,)}
    for i in range(L):
        p = f"transformer.h.{i}."
        shapes.update({p + "ln_1.weight": (C,), p + "ln_2.weight": (C,), p + "attn.c_attn.weight": (3 * C, C),
                       p + "attn.c_proj.weight": (C, C), p + "mlp.c_fc.weight": (4 * C, C),
                       p + "mlp.c_proj.weight": (C, 4 * C)})
        if bias:
            shapes.update({p + "ln_1.bias": (C,), p + "ln_2.bias": (C,), p + "attn.c_attn.bias": (3 * C,),
                           p + "attn.c_proj.bias": (C,), p + "mlp.c_fc.bias": (4 * C,), p + "mlp.c_proj.bias": (C,)})
    if bias:
        shapes["transformer.ln_f.bias"] = (C,)
    return shapes


@pytest.mark.parametrize("bias", [True, False])
def test_plain_is_nanogpt(bias):
    torch.manual_seed(0)
    cfg = tiny(bias=bias)
    model = GPT(cfg)
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == nanogpt_param_shapes(96, 16, 2, 24, bias)
    with torch.no_grad():  # non-trivial norms and biases, so every parameter matters
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 96, (3, 16))
    targets = torch.randint(0, 96, (3, 16))
    logits, loss = model(idx, targets)
    ref_logits, ref_loss = nanogpt_reference(sd, idx, 2, 2, targets)
    assert logits.shape == (3, 16, 96)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    full, none = model(idx)  # targets=None: the full logits, not only the last position
    assert none is None and full.shape == (3, 16, 96)


def test_gpt2_small_param_count():
    model = GPT(GPTConfig())
    assert model.num_params() == 123_653_376 + 36_096  # nanoGPT's "123.69M" for vocab 50304
    assert model.num_params(non_embedding=False) == model.num_params() + 1024 * 768
    flops = model.estimate_flops_per_token(1024)
    assert flops == 6 * model.num_params() + 12 * 12 * 768 * 1024


def test_hc_at_init_equals_plain():
    torch.manual_seed(0)
    plain = GPT(tiny())
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = GPT(tiny(scheme="hc", n_streams=4))
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(".hc_attn." in k or ".hc_mlp." in k for k in missing)
    idx = torch.randint(0, 96, (2, 16))
    torch.testing.assert_close(model(idx)[0], plain(idx)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scheme,n", SCHEMES_N)
def test_every_scheme_forward_backward(scheme, n):
    torch.manual_seed(0)
    model = GPT(tiny(scheme=scheme, n_streams=n, dropout=0.1))
    idx = torch.randint(0, 96, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 96) and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    per_token = model(idx, idx, reduction="none")[1]
    assert per_token.shape == (2, 16)


@pytest.mark.parametrize("scheme,n", SCHEMES_N)
def test_optimizer_groups(scheme, n):
    """Decay: 2-D weights outside the connections + each connection's dynamic projections;
    no decay: norms, biases, static coefficients and gates. Every parameter exactly once."""
    model = GPT(tiny(scheme=scheme, n_streams=n))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert not decay & no_decay
    assert decay | no_decay == {id(p) for p in model.parameters()}
    conn_params = {id(p) for c in model.connections() for p in c.parameters()}
    conn_decay = {id(p) for c in model.connections() for p in c.decay_parameters()}
    assert decay & conn_params == conn_decay
    for name, p in model.named_parameters():
        if id(p) not in conn_params:
            assert (id(p) in decay) == (p.dim() >= 2), name
    if scheme != "plain":
        assert conn_decay and conn_params - conn_decay  # both kinds exist


def test_connections_layer_indices_and_names():
    model = GPT(tiny(scheme="kromhc", n_streams=4, n_layer=3))
    conns = model.connections()
    assert [c.layer_idx for c in conns] == list(range(6))
    assert model.connection_names() == ["L00.attn", "L00.mlp", "L01.attn", "L01.mlp", "L02.attn", "L02.mlp"]


def test_stream_dtype_bf16():
    torch.manual_seed(0)
    model = GPT(tiny(scheme="kromhc", n_streams=4, stream_dtype="bfloat16"))
    seen = []
    model.transformer.h[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    logits, loss = model(torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16)))
    assert seen == [torch.bfloat16] and torch.isfinite(loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16)))
    assert seen[-1] == torch.bfloat16 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="stream_dtype"):
        GPT(tiny(stream_dtype="float16"))


def test_branch_init_scale_sqrt_n():
    torch.manual_seed(0)
    big = GPT(tiny(scheme="hc", n_streams=4, n_embd=256, n_head=4, hc_branch_init_scale_sqrt_n=True))
    torch.manual_seed(0)
    ref = GPT(tiny(scheme="hc", n_streams=4, n_embd=256, n_head=4))
    s_big = big.transformer.h[0].mlp.c_proj.weight.std().item()
    s_ref = ref.transformer.h[0].mlp.c_proj.weight.std().item()
    assert s_ref == pytest.approx(0.02 / math.sqrt(4), rel=0.05)
    assert s_big / s_ref == pytest.approx(2.0, rel=0.05)


def test_bad_scheme_and_streams():
    with pytest.raises(ValueError, match="unknown residual scheme"):
        GPT(tiny(scheme="foo"))
    with pytest.raises(ValueError, match="n_streams=1"):
        GPT(tiny(scheme="plain", n_streams=4))
    with pytest.raises(ValueError, match="mhc_lite"):
        GPT(tiny(scheme="mhc_lite", n_streams=8))


def test_generate():
    torch.manual_seed(0)
    model = GPT(tiny(scheme="kromhc", n_streams=4)).eval()
    idx = torch.randint(0, 96, (2, 5))
    out = model.generate(idx, 20, temperature=0.8, top_k=10)  # runs past block_size (16): crops the context
    assert out.shape == (2, 25) and torch.equal(out[:, :5], idx)
    assert int(out.max()) < 96


@pytest.mark.parametrize("scheme", ["mhc", "kromhc"])
def test_compiles_without_graph_breaks(scheme):
    """The whole model is one graph for torch.compile (checked with the aot_eager backend: no C++ or GPU needed)."""
    torch.manual_seed(0)
    model = GPT(tiny(scheme=scheme, n_streams=4))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, 96, (2, 16))
    loss = compiled(idx, idx)[1]
    loss.backward()
    torch.testing.assert_close(loss, model(idx, idx)[1])
    assert compiled(idx, idx, reduction="none")[1].shape == (2, 16)
