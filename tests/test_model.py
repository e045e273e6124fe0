"""model.py: plain == nanoGPT, HC at init == plain, every scheme runs, optimizer groups, FLOPs."""

import math

import pytest
import torch
import torch.nn.functional as F

import numerics
import optim
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


@pytest.mark.numerics
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
    # two fp32 computations (fused attention and Linear against the written-out ones): the forward's reductions
    # (gpt2_path; the logits leave out its last two, the softmax over the vocabulary and the mean over tokens)
    rel = numerics.gpt2_path(2, 24, 2, 16, 96, 3 * 16, backward=False)
    numerics.assert_close(logits, ref_logits, rel, "logits")
    numerics.assert_close(loss, ref_loss, rel, "loss")
    full, none = model(idx)  # targets=None: the full logits, not only the last position
    assert none is None and full.shape == (3, 16, 96)


def test_gpt2_small_param_count():
    model = GPT(GPTConfig())
    assert model.num_params() == 123_653_376 + 36_096  # nanoGPT's "123.69M" for vocab 50304
    assert model.num_params(non_embedding=False) == model.num_params() + 1024 * 768
    flops = model.estimate_flops_per_token(1024)
    assert flops == 6 * model.num_params() + 12 * 12 * 768 * 1024


@pytest.mark.numerics
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
    # every stream is plain's residual bit for bit (tests/test_hc.py: test_hc_at_init_is_plain_pre_norm_residual);
    # then the readout's mean over the n copies rounds, and the final norm over C and lm_head over C follow it
    numerics.assert_close(model(idx)[0], plain(idx)[0], numerics.chain(4, 24, 24, 24), "logits")


@pytest.mark.parametrize("scheme,n", SCHEMES_N)
def test_every_scheme_forward_backward(scheme, n):
    torch.manual_seed(0)
    model = GPT(tiny(scheme=scheme, n_streams=n, dropout=0.1))
    idx = torch.randint(0, 96, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 96)
    # at init the logits are ~0.1 in size: on targets unrelated to the input (the tied embedding
    # favours the input token itself) the loss is ln(vocab) to within a few hundredths
    assert model(idx, torch.randint(0, 96, (2, 16)))[1].item() == pytest.approx(math.log(96), abs=0.05)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    per_token = model(idx, idx, reduction="none")[1]
    assert per_token.shape == (2, 16)


@pytest.mark.parametrize("scheme,n", SCHEMES_N)
def test_optimizer_groups(scheme, n):
    """Decay: 2-D weights outside the connections + each connection's dynamic projections;
    no decay: norms, biases, static coefficients and gates. Every parameter exactly once."""
    model = GPT(tiny(scheme=scheme, n_streams=n))
    opt = optim.build(model, optim.OptimConfig(weight_decay=0.1, learning_rate=1e-3, beta1=0.9, beta2=0.95), "cpu")
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


@pytest.mark.numerics
def test_stream_dtype_bf16():
    torch.manual_seed(0)
    model = GPT(tiny(scheme="kromhc", n_streams=4, stream_dtype="bfloat16"))
    seen = []
    model.transformer.h[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    fp32 = GPT(tiny(scheme="kromhc", n_streams=4))
    fp32.load_state_dict(model.state_dict())
    x, y = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    logits, loss = model(x, y)
    assert seen == [torch.bfloat16]
    # the same model, bf16 roundings (u(bf16) each, relative to the value rounded) beside fp32's forward: the
    # streams stored in bf16, from the embedding and by each of the 4 connections, and each x_in (9)
    u = numerics.u(torch.bfloat16)
    fp32_path = numerics.gpt2_path(2, 24, 2, 16, 96, 32, n=4, res=numerics.res_widths("kromhc", 4), backward=False)
    ref = fp32(x, y)[0]
    numerics.assert_close(logits, ref, 9 * u + fp32_path, "logits, bf16 streams")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, y)
    # autocast adds, per layer, the Linears' inputs, weights and outputs (c_attn 3, c_proj 2, c_fc 3, c_proj 2: the
    # second of each pair takes a bf16 input), the attention's and GELU's bf16 outputs (2 + 1); then lm_head's 3
    assert seen[-1] == torch.bfloat16
    numerics.assert_close(logits, ref, (9 + 2 * 13 + 3) * u + fp32_path, "logits, bf16 streams and autocast")
    with pytest.raises(ValueError, match="stream_dtype"):
        GPT(tiny(stream_dtype="float16"))


def test_branch_init_scale_sqrt_n():
    torch.manual_seed(0)
    big = GPT(tiny(scheme="hc", n_streams=4, n_embd=256, n_head=4, hc_branch_init_scale_sqrt_n=True))
    torch.manual_seed(0)
    ref = GPT(tiny(scheme="hc", n_streams=4, n_embd=256, n_head=4))
    s_big = big.transformer.h[0].mlp.c_proj.weight.std().item()
    s_ref = ref.transformer.h[0].mlp.c_proj.weight.std().item()
    # sampling, not rounding: the std of N = 262,144 draws is within a few 1 / sqrt(2 N) = 0.14% of its value
    assert s_ref == pytest.approx(0.02 / math.sqrt(4), rel=0.05)
    assert s_big / s_ref == pytest.approx(2.0, rel=0.05)


def test_bad_scheme_and_streams():
    with pytest.raises(ValueError, match="config key 'scheme' must be one of"):
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


def fixed_logits_model(logits):
    """A GPT whose next-token logits are always ``logits`` (V,), whatever the context."""
    model = GPT(tiny()).eval()
    model.forward = lambda idx, targets=None, reduction="mean": (logits.expand(*idx.shape, -1).clone(), None)
    return model


def test_generate_top_k_and_temperature():
    V = 96
    logits = torch.linspace(-2, 2, V)[torch.randperm(V, generator=torch.Generator().manual_seed(0))]
    model = fixed_logits_model(logits)
    start = torch.zeros(20_000, 1, dtype=torch.long)

    def frequencies(**kw):
        torch.manual_seed(1)
        return torch.bincount(model.generate(start, 1, **kw)[:, 1], minlength=V).double() / len(start)

    def expected(T, k=V):  # softmax(logits / T) over the k largest logits, in float64
        keep = logits.double().argsort(descending=True)[:k]
        p = torch.zeros(V, dtype=torch.float64)
        p[keep] = torch.exp(logits.double()[keep] / T)
        return p / p.sum()

    tv = lambda p, q: 0.5 * (p - q).abs().sum().item()  # noqa: E731  total variation distance
    # sampling noise at 20,000 draws: TV ~0.03; the distributions below differ from each other by > 0.15
    assert tv(expected(0.5), expected(2.0)) > 0.3 and tv(expected(0.5), expected(1.0)) > 0.15
    for T in (0.5, 1.0, 2.0):
        assert tv(frequencies(temperature=T), expected(T)) < 0.05, T
    f = frequencies(temperature=1.5, top_k=5)
    assert set(f.nonzero().flatten().tolist()) == set(logits.argsort(descending=True)[:5].tolist())
    assert tv(f, expected(1.5, k=5)) < 0.02
    # top_k=1 is greedy decoding at any temperature, token after token
    torch.manual_seed(2)
    out = model.generate(torch.zeros(50, 2, dtype=torch.long), 4, temperature=3.0, top_k=1)
    assert (out[:, 2:] == logits.argmax()).all()


def sinkhorn_probabilities(logits, iters):
    """Sinkhorn-Knopp in the probability domain, float64: columns then rows, ending on rows."""
    K = torch.exp(logits.double())
    for _ in range(iters):
        K = K / K.sum(-2, keepdim=True)
        K = K / K.sum(-1, keepdim=True)
    return K


@pytest.mark.parametrize("scheme", ["hc", "mhc", "mhc_lite", "kromhc"])
def test_config_options_reach_every_connection(scheme):
    """GPTConfig's sinkhorn_iters, res_logit_init, gate_init and coeff_norm arrive in each of the connections."""
    n = 4
    model = GPT(tiny(scheme=scheme, n_streams=n, sinkhorn_iters=3, res_logit_init=-2.5, gate_init=0.3,
                     coeff_norm="stream"))
    identity_logits = {  # 0 where the logit selects the identity, res_logit_init elsewhere
        "mhc": -2.5 * (1 - torch.eye(n)).flatten(),
        "mhc_lite": torch.tensor([0.0] + [-2.5] * 23),           # 4! permutations, the identity first
        "kromhc": torch.tensor([0.0, -2.5, 0.0, -2.5]),          # two 2 x 2 factors: (identity, swap) each
    }
    for conn in model.connections():
        gates = {k: p.item() for k, p in conn.named_parameters() if p.dim() == 0}
        assert sorted(gates) == (["s_alpha", "s_beta"] if scheme == "hc" else ["alpha_post", "alpha_pre", "alpha_res"])
        assert all(v == pytest.approx(0.3) for v in gates.values()), gates   # fp32(0.3): u = 6e-8 off; approx 1e-6
        if scheme != "hc":
            torch.testing.assert_close(conn.b_res.detach(), identity_logits[scheme], rtol=0, atol=0)
            assert conn.coeff_norm == "stream"
    if scheme == "mhc":  # phi = 0 at init: H_res = Sinkhorn(b_res), here with random logits and 3 iterations
        conn = model.connections()[1]
        with torch.no_grad():
            conn.b_res.copy_(2 * torch.randn(n * n, generator=torch.Generator().manual_seed(0)))
        H = conn.coefficients(torch.randn(1, 2, n, 24))[2][0, 0].double()
        z = conn.b_res.detach().view(n, n)
        # phi = 0, so the logits are b_res exactly: fp32 against float64 is Sinkhorn's rounding
        numerics.assert_close(H, sinkhorn_probabilities(z, 3), numerics.sinkhorn_path(n, 3, z.abs().max().item()),
                              "H_res")
        assert (H - sinkhorn_probabilities(z, 20)).abs().max() > 1e-3   # the count matters for these logits


# mhc's 20 Sinkhorn iterations take 16 s to compile: only kromhc runs under every kernel set
@pytest.mark.parametrize("scheme", ["mhc", pytest.param("kromhc", marks=pytest.mark.numerics)])
def test_compiles_without_graph_breaks(scheme):
    """The whole model is one graph for torch.compile (checked with the aot_eager backend: no C++ or GPU needed)."""
    torch.manual_seed(0)
    model = GPT(tiny(scheme=scheme, n_streams=4))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, 96, (2, 16))
    loss = compiled(idx, idx)[1]
    loss.backward()
    # AOT autograd's decomposed graph against eager: the forward's sums in perhaps other orders
    rel = numerics.gpt2_path(2, 24, 2, 16, 96, 32, n=4, res=numerics.res_widths(scheme, 4, 20), backward=False)
    numerics.assert_close(loss, model(idx, idx)[1], rel, "loss")
    assert compiled(idx, idx, reduction="none")[1].shape == (2, 16)
