"""
GPT with a pluggable residual scheme, in two architectures (GPTConfig.arch).

Every sublayer (attention, MLP) of every block is wrapped by a connection from hc.py:
    h_new = conn(h, branch)        h: (B, T, n, C), the n residual streams
The embedding is expanded to n streams before the first block; at the end the streams are
averaged before the final norm (readout="mean", the HC paper), normed one by one and summed
(readout="norm_sum", the published mHC-lite / KromHC code), or weighted by DeepSeek-V4's learned,
input-dependent readout (readout="hc_head", hc.HCHead). With scheme="plain" (n = 1) each architecture
is exactly its reference model: the same parameter names and shapes, the same output.

arch="gpt2": nanoGPT's GPT-2 (learned position embedding, LayerNorm, GELU MLP, tied
embedding and unembedding, optional biases, dropout, GPT-2's init).

arch="nanochat": nanochat's d12-era model, the model of KromHC's main results (docs/nanochat.md names
the nanochat commits it follows). Its features:
- rotary position embeddings (base 10,000) on queries and keys; no position embedding
- QK-norm: queries and keys RMS-normalised per head after the rotation
- parameter-free RMSNorm (F.rms_norm, no weights): after the token embedding, before each
  sublayer, and before the unembedding
- ReLU^2 MLP, 4x wide
- no biases anywhere; untied embedding and unembedding
- logits soft-capped at 15: 15 tanh(z / 15), in fp32 (the unembedding's output is cast up first,
  also under bf16 autocast, as nanochat does)
- as many key/value heads as query heads (nanochat's n_kv_head = n_head); nanochat's heads
  are 128 wide, so d12 (768 wide) has n_head = 6; n_head is taken from the config
- init (nanochat_init="e1770a3"): every Linear normal with std 1/sqrt(fan_in) * min(1, sqrt(fan_out /
  fan_in)) (arXiv 2310.17813), the embedding with std 1, the unembedding and every c_proj zero;
  nanochat_init="48abd7d": c_q, c_k, c_v, c_fc uniform with std 1/sqrt(n_embd) (bound sqrt(3) times
  that), the unembedding normal with std 0.001, c_proj zero
- embedding_dtype="bfloat16": the token embedding stored in bf16, as nanochat stores it on CUDA
  (its optimizer then updates bf16 weights); default fp32. The embedding's output is then bf16;
  the streams are still held in stream_dtype.
Where it differs from nanochat: the rotary tables are computed in fp32 and cast to the
activations' dtype (bf16 under autocast, as nanochat keeps them); the logits of a vocabulary
padded to a multiple of 64 keep their padded columns (nanochat slices them off before the
softmax; a tokenizer of 65,536 or 4,096 tokens has none).
"""

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts, noop_context_fn

import hc
from errors import ConfigError
from keys import key


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout_p = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout_p if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block; each sublayer's residual is a connection from hc.py."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        # connection 2*layer wraps attention, 2*layer+1 the MLP (decides each one's home stream)
        self.hc_attn = hc.connection(config, config.n_embd, 2 * layer)
        self.hc_mlp = hc.connection(config, config.n_embd, 2 * layer + 1)

    def forward(self, h):  # h: (B, T, n, C)
        dt = self.ln_1.weight.dtype  # the branches compute in the weights' dtype (or autocast's), whatever the stream's
        # h = hc_mlp(hc_attn(h, attn), mlp); the fused path joins the two connections in one kernel
        return hc.run_connections((self.hc_attn, self.hc_mlp), (lambda x: self.attn(self.ln_1(x.to(dt))),
                                                                 lambda x: self.mlp(self.ln_2(x.to(dt)))), h)


# -----------------------------------------------------------------------------
# arch="nanochat": nanochat's d12-era blocks (the features listed at the top of this file)

ARCHS = ("gpt2", "nanochat")
LOGIT_SOFTCAP = 15.0
NANOCHAT_INITS = ("e1770a3", "48abd7d")  # nanochat's two inits, named by their commits (docs/nanochat.md)
EMBEDDING_DTYPES = ("float32", "bfloat16")


def norm(x):
    """Parameter-free RMSNorm over the last dimension (F.rms_norm: no weight, no bias)."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len, head_dim, base=10000.0):
    """cos and sin (seq_len, head_dim / 2) of the angles t * base^(-2i / head_dim), in fp32."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate the pairs (x[i], x[i + D/2]) of every head of x (B, T, H, D) by the angles of their
    position (cos, sin: (T, D/2)), as nanochat does: q.k then depends on positions only through
    their difference."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # broadcast over the heads
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class RotaryAttention(nn.Module):
    """Causal self-attention with rotary embeddings and QK-norm; no biases, n_kv_head = n_head."""

    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.n_head, self.head_dim = config.n_head, C // config.n_head
        self.c_q = nn.Linear(C, C, bias=False)
        self.c_k = nn.Linear(C, C, bias=False)
        self.c_v = nn.Linear(C, C, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # rotary: relative positions
        q, k = norm(q), norm(k)  # QK-norm
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class ReluSquaredMLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2


class NanochatBlock(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); each residual is a connection from hc.py."""

    def __init__(self, config, layer):
        super().__init__()
        self.attn = RotaryAttention(config)
        self.mlp = ReluSquaredMLP(config)
        self.hc_attn = hc.connection(config, config.n_embd, 2 * layer)
        self.hc_mlp = hc.connection(config, config.n_embd, 2 * layer + 1)

    def forward(self, h, cos, sin):  # h: (B, T, n, C)
        dt = self.mlp.c_fc.weight.dtype  # the branches compute in the weights' dtype (or autocast's)
        # h = hc_mlp(hc_attn(h, attn), mlp); the fused path joins the two connections in one kernel
        return hc.run_connections((self.hc_attn, self.hc_mlp), (lambda x: self.attn(norm(x.to(dt)), cos, sin),
                                                                 lambda x: self.mlp(norm(x.to(dt)))), h)


# "bfloat16_hc" is the published code's precision under bf16 autocast: its n-stream mixing runs
# in bf16, so the carried streams are rounded to bf16 at every sublayer, while nanoGPT's plain
# residual x = x + f(x) stays fp32.
STREAM_DTYPES = ("float32", "bfloat16", "bfloat16_hc")
READOUTS = ("mean", "norm_sum", "hc_head")
RECOMPUTE = ("none", "connections", "blocks", "streams")
# recompute="streams" keeps these ops' outputs (every matmul, the attention) and recomputes the rest: the
# streams, the coefficients, the reads, the norms and activations; never a matmul or the attention
BRANCH_OPS = [torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
              *(getattr(torch.ops.aten, op).default for op in (
                  "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                  "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"))]
GPT2_VOCAB = 50304  # GPT-2's 50,257 tokens padded up to a multiple of 64


@dataclass
class GPTConfig(hc.SchemeConfig):
    """A model: its residual scheme (hc.SchemeConfig's keys) and the architecture's (the config keys of
    model.py). Checked when made: a ConfigError names a value outside its declaration."""
    SECTION = "model (model.py)"
    arch: str = key("gpt2", "gpt2 (nanoGPT) | nanochat (nanochat's d12-era model: rotary, QK-norm, ReLU^2, softcap; "
                    "model.py)", choices=ARCHS)
    n_layer: int = key(12, "transformer blocks", above=0)
    n_head: int = key(12, "attention heads", above=0)
    n_embd: int = key(768, "model width (d_model)", above=0)
    block_size: int = key(1024, "sequence length", above=0)
    vocab_size: int = key(0, "0 -> the data's tokenizer's vocab rounded up to a multiple of 64 (50304 for GPT-2; "
                          "a GPTConfig made without data: 50304)", at_least=0)
    dropout: float = key(0.0, "dropout probability (0 for pretraining)", at_least=0.0, below=1.0)
    bias: bool = key(True, "biases in the linear layers and LayerNorms (GPT-2)")
    stream_dtype: str = key("float32", "float32 | bfloat16 | bfloat16_hc (bf16 for n > 1, fp32 for plain): the "
                            "residual streams", choices=STREAM_DTYPES)
    readout: str = key("mean", "mean: ln_f(stream mean) | norm_sum: sum of ln_f(each stream) (published code) | "
                       "hc_head: DeepSeek-V4's learned readout", choices=READOUTS, applies={"scheme": hc.NOT_PLAIN})
    decay_static: bool = key(False, "also weight-decay hc's and mhc's 2-D static coefficients, as the published code",
                             applies={"scheme": ("hc", "mhc")})
    hc_branch_init_scale_sqrt_n: bool = key(False, "HC paper: output projections' init std x sqrt(n)",
                                            applies={"scheme": hc.NOT_PLAIN})
    recompute: str = key("none", "none | connections | blocks | streams: recompute activations in backward instead of "
                         "saving them (connections: the coefficients and pre-mix; blocks: whole blocks; streams: "
                         "the mHC paper's stream recompute, no matmul again)", choices=RECOMPUTE)
    recompute_group: int = key(0, "recompute=streams: blocks per group (the streams are kept at each group's start); "
                               "0 -> the mHC paper's L_r = round(sqrt(n n_layer / (n + 2)))", at_least=0,
                               applies={"recompute": ("streams",)})
    nanochat_init: str = key("e1770a3", "arch nanochat: e1770a3 (normal, zero unembedding) | 48abd7d (uniform; from "
                             "2026-01-01)", choices=NANOCHAT_INITS, applies={"arch": ("nanochat",)})
    embedding_dtype: str = key("float32", "arch nanochat: float32 | bfloat16 (token embedding stored in bf16: "
                               "nanochat on CUDA)", choices=EMBEDDING_DTYPES, applies={"arch": ("nanochat",)})

    def __post_init__(self):
        super().__post_init__()
        if self.vocab_size == 0:
            self.vocab_size = GPT2_VOCAB
        if self.n_embd % self.n_head:
            raise ConfigError(f"config key 'n_embd' ({self.n_embd}) must be divisible by 'n_head' ({self.n_head})")
        if self.readout == "hc_head" and self.n_streams < 2:
            raise ConfigError(f"readout 'hc_head' weighs n streams: it takes an n-stream scheme (n_streams >= 2), "
                              f"got scheme={self.scheme!r} with n_streams={self.n_streams}; use readout='mean'")
        if self.arch == "nanochat":
            if (self.n_embd // self.n_head) % 2:
                raise ConfigError(f"config key 'n_head': arch 'nanochat' needs an even head size n_embd / n_head for "
                                  f"the rotary pairs, got n_embd={self.n_embd}, n_head={self.n_head}")
            for name in ("bias", "dropout", "hc_branch_init_scale_sqrt_n"):
                value = getattr(self, name)
                if value:
                    raise ConfigError(f"config key {name!r}: arch 'nanochat' has no biases, no dropout and "
                                      f"zero-initialised output projections: set {name}="
                                      f"{'False' if isinstance(value, bool) else 0} (got {name}={value!r})")
        if self.embedding_dtype != "float32" and self.arch != "nanochat":
            raise ConfigError(f"embedding_dtype {self.embedding_dtype!r} is nanochat's (arch='nanochat'); GPT-2's "
                              f"embedding is tied to lm_head: keep embedding_dtype='float32'")


def run_group(blocks, h, *args):
    for block in blocks:
        h = block(h, *args)
    return h


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.stream_dtype = torch.bfloat16 if config.stream_dtype == "bfloat16" or (
            config.stream_dtype == "bfloat16_hc" and config.n_streams > 1) else torch.float32
        if config.arch == "nanochat":
            self._build_nanochat()
        else:
            self._build_gpt2()
        for c in self.connections():
            c.recompute = config.recompute == "connections"
        if config.readout == "hc_head":  # built last: its init draws leave the rest of the model as with "mean"
            self.hc_head = hc.HCHead(config.n_embd, config.n_streams, config.hc_eps)

    def _build_gpt2(self):
        config = self.config

        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

        # nanoGPT's init for everything but the connections, which initialise themselves
        conn_ids = {id(m) for c in self.connections() for m in c.modules()}
        for m in self.modules():
            if id(m) not in conn_ids:
                self._init_weights(m)
        # scaled init of the residual projections, per GPT-2
        std = 0.02 / math.sqrt(2 * config.n_layer)
        if config.hc_branch_init_scale_sqrt_n:
            std *= math.sqrt(config.n_streams)
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=std)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _build_nanochat(self):
        config = self.config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # no position embedding: rotary instead
            h=nn.ModuleList([NanochatBlock(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied
        cos, sin = rotary_tables(config.block_size, config.n_embd // config.n_head)
        self.register_buffer("rotary_cos", cos, persistent=False)  # recomputed, never saved
        self.register_buffer("rotary_sin", sin, persistent=False)

        # nanochat's init for everything but the connections, which initialise themselves
        if config.nanochat_init == "e1770a3":
            conn_ids = {id(m) for c in self.connections() for m in c.modules()}
            for m in self.modules():
                if id(m) in conn_ids:
                    continue
                if isinstance(m, nn.Linear):
                    fan_out, fan_in = m.weight.shape
                    std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                    torch.nn.init.normal_(m.weight, mean=0.0, std=std)
                elif isinstance(m, nn.Embedding):
                    torch.nn.init.normal_(m.weight, mean=0.0, std=1.0)
            torch.nn.init.zeros_(self.lm_head.weight)  # uniform logits at init: loss = ln(vocab_size)
        else:  # 48abd7d: uniform (no outliers) with the same std 1/sqrt(n_embd); a small unembedding
            torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
            torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
            bound = 3 ** 0.5 * config.n_embd ** -0.5
            for block in self.transformer.h:
                for m in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                    torch.nn.init.uniform_(m.weight, -bound, bound)
        for block in self.transformer.h:  # every branch starts as the zero function
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
        if config.embedding_dtype == "bfloat16":
            self.transformer.wte.to(torch.bfloat16)

    def connections(self):
        """The connections in depth order: two per block, attention then MLP."""
        return [c for b in self.transformer.h for c in (b.hc_attn, b.hc_mlp)]

    def hc_modules(self):
        """Every module with hyper-connection parameters: the connections, and the hc_head readout."""
        return self.connections() + ([self.hc_head] if self.config.readout == "hc_head" else [])

    def connection_names(self):
        return [f"L{i:02d}.{s}" for i in range(self.config.n_layer) for s in ("attn", "mlp")]

    def run_blocks(self, h, *args):
        """h through every block (block(h, *args)). recompute="blocks": each block under checkpoint, only its
        input streams kept for backward. recompute="streams" (mHC paper Sec. 4.3.2, Eq. 20): groups of
        recompute_group blocks under selective checkpointing that keeps the group's input streams and the
        outputs of BRANCH_OPS (every matmul and the attention: each branch's output F(x) among them), and
        recomputes in backward the streams, the coefficients, the reads and their norms, never a matmul.
        Any block class: the wrappers do not look inside."""
        blocks, mode = self.transformer.h, self.config.recompute
        if mode not in ("blocks", "streams") or not torch.is_grad_enabled():
            for block in blocks:
                h = block(h, *args)
            return h
        size = 1 if mode == "blocks" else self.recompute_group()
        keep = partial(create_selective_checkpoint_contexts, BRANCH_OPS) if mode == "streams" else noop_context_fn
        for i in range(0, len(blocks), size):
            h = checkpoint(run_group, blocks[i:i + size], h, *args, use_reentrant=False, context_fn=keep)
        return h

    def recompute_group(self):
        """recompute="streams"'s blocks per group: recompute_group, or the mHC paper's L_r = sqrt(n L / (n + 2))
        (Eq. 20: the n C streams kept once per group against the C of each layer's branch output), rounded."""
        c = self.config
        return c.recompute_group or max(1, min(c.n_layer, round(math.sqrt(c.n_streams * c.n_layer / (c.n_streams + 2)))))

    def num_params(self, non_embedding=True):
        """Number of parameters; non_embedding subtracts the embeddings that cost no matmul: gpt2's
        position embedding (its token embedding is tied to lm_head, so it counts, as in nanoGPT),
        nanochat's untied token embedding (as nanochat's FLOPs estimate does)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            lookup = self.transformer.wte if self.config.arch == "nanochat" else self.transformer.wpe
            n_params -= lookup.weight.numel()
        return n_params

    get_num_params = num_params  # nanoGPT's name

    def forward(self, idx, targets=None, reduction="mean"):
        """Returns (logits (B, T, V), loss). loss is None without targets; with reduction="none"
        it is the per-token loss (B, T) (targets = -1 are ignored and give 0)."""
        b, t = idx.size()
        assert t <= self.config.block_size, f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        logits = self.nanochat_logits(idx) if self.config.arch == "nanochat" else self.gpt2_logits(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1),
                                   ignore_index=-1, reduction=reduction)
            if reduction == "none":
                loss = loss.view(b, t)
        return logits, loss

    def gpt2_logits(self, idx):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        tok_emb = self.transformer.wte(idx)  # (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        h = hc.expand_streams(x, self.config.n_streams).to(self.stream_dtype)
        h = self.run_blocks(h)
        return self.lm_head(self.read_out(h, self.transformer.ln_f))

    def nanochat_logits(self, idx):
        t = idx.size(1)
        cos, sin = self.rotary_cos[:t], self.rotary_sin[:t]
        x = norm(self.transformer.wte(idx))  # norm after the token embedding
        h = hc.expand_streams(x, self.config.n_streams).to(self.stream_dtype)
        h = self.run_blocks(h, cos, sin)
        logits = self.lm_head(self.read_out(h, norm)).float()  # norm before the unembedding; the cap in fp32
        return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)  # soft cap: |logit| < 15

    def read_out(self, h, norm):
        """The streams (B, T, n, C) -> the unembedding's input (B, T, C): norm(mean of the streams)
        (readout="mean", HC paper), the sum of norm(each stream) ("norm_sum", the published code), or
        norm(Σ_j w_j h_j) with DeepSeek-V4's input-dependent weights w ("hc_head")."""
        dt = self.lm_head.weight.dtype
        if self.config.readout == "norm_sum":
            return norm(h.to(dt)).sum(dim=-2)
        if self.config.readout == "hc_head":
            return norm(self.hc_head(h).to(dt))
        return norm(hc.reduce_streams(h).to(dt))

    def connection_decay_ids(self):
        """ids of the connections' (and hc_head's) parameters that take weight decay: the dynamic
        projections, and with decay_static the static coefficients the published code decays."""
        conns = self.hc_modules()
        ids = {id(p) for c in conns for p in c.decay_parameters()}
        if self.config.decay_static:
            ids |= {id(p) for c in conns for p in c.static_decay_parameters()}
        return ids

    def estimate_flops_per_token(self, seq_len):
        """Model FLOPs per token of a training step (forward + backward): 6 x (parameters except
        the embedding lookups: num_params()) + 12 x layers x d_model x seq_len (PaLM appendix B)."""
        cfg = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * seq_len

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, stop_token=None, generator=None):
        """Sample up to max_new_tokens tokens after the context idx (LongTensor (b, t)); temperature 0 is greedy
        (the argmax at every step). With stop_token, stop once every row has produced it (a row's tokens after
        its first stop_token are not meaningful). generator: the torch.Generator to sample with (default: torch's)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            if temperature == 0:
                idx_next = logits[:, -1, :].argmax(-1, keepdim=True)
            else:
                logits = logits[:, -1, :] / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float('Inf')
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
            if stop_token is not None:
                done |= idx_next[:, 0] == stop_token
                if bool(done.all()):
                    break
        return idx
