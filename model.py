"""
GPT-2 (nanoGPT's architecture) with a pluggable residual scheme.

Every sublayer (attention, MLP) of every block is wrapped by a connection from hc.py:
    h_new = conn(h, branch)        h: (B, T, n, C), the n residual streams
The embedding is expanded to n streams before the first block and the streams are averaged
before the final LayerNorm. With scheme="plain" (n = 1) this is exactly nanoGPT's model: the
same parameter names and shapes, the same output.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

import hc


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False until 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


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
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        # connection 2*layer wraps attention, 2*layer+1 the MLP (decides each one's home stream)
        self.hc_attn = hc.make_connection(config.scheme, config.n_embd, config.n_streams, 2 * layer,
                                          **config.hc_options())
        self.hc_mlp = hc.make_connection(config.scheme, config.n_embd, config.n_streams, 2 * layer + 1,
                                         **config.hc_options())

    def forward(self, h):  # h: (B, T, n, C)
        dt = self.ln_1.weight.dtype  # the branches compute in the weights' dtype (or autocast's), whatever the stream's
        # h = hc_mlp(hc_attn(h, attn), mlp); the fused path joins the two connections in one kernel
        return hc.run_connections((self.hc_attn, self.hc_mlp), (lambda x: self.attn(self.ln_1(x.to(dt))),
                                                                 lambda x: self.mlp(self.ln_2(x.to(dt)))), h)


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2
    # residual scheme (hc.py): "plain", "hc", "mhc", "mhc_lite", "kromhc"
    scheme: str = "plain"
    n_streams: int = 1
    stream_dtype: str = "float32"  # dtype of the residual streams: "float32" | "bfloat16"
    sinkhorn_iters: int = 20  # mhc
    kron_factors: tuple | None = None  # kromhc; None: the prime factors of n_streams
    res_logit_init: float = -8.0  # mhc / mhc_lite / kromhc: off-identity H_res logit at init
    gate_init: float = 0.01  # mhc / mhc_lite / kromhc: the alpha gates at init
    hc_branch_init_scale_sqrt_n: bool = False  # HC paper: output projections' init std x sqrt(n)

    def hc_options(self):
        if self.scheme == "plain":
            return {}
        opts = dict(sinkhorn_iters=self.sinkhorn_iters, res_logit_init=self.res_logit_init,
                    gate_init=self.gate_init)
        if self.kron_factors is not None:
            opts["kron_factors"] = tuple(self.kron_factors)
        return opts


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        if config.stream_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"stream_dtype must be 'float32' or 'bfloat16', got {config.stream_dtype!r}")
        self.config = config

        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
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

    def connections(self):
        """The connections in depth order: two per block, attention then MLP."""
        return [c for b in self.transformer.h for c in (b.hc_attn, b.hc_mlp)]

    def connection_names(self):
        return [f"L{i:02d}.{s}" for i in range(self.config.n_layer) for s in ("attn", "mlp")]

    def num_params(self, non_embedding=True):
        """Number of parameters; non_embedding subtracts the position embeddings (the token
        embeddings are tied to lm_head, so they count, as in nanoGPT)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    get_num_params = num_params  # nanoGPT's name

    def forward(self, idx, targets=None, reduction="mean"):
        """Returns (logits (B, T, V), loss). loss is None without targets; with reduction="none"
        it is the per-token loss (B, T) (targets = -1 are ignored and give 0)."""
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size, f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=device)

        tok_emb = self.transformer.wte(idx)  # (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        h = hc.expand_streams(x, self.config.n_streams).to(getattr(torch, self.config.stream_dtype))
        for block in self.transformer.h:
            h = block(h)
        x = self.transformer.ln_f(hc.reduce_streams(h).to(self.lm_head.weight.dtype))
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1),
                                   ignore_index=-1, reduction=reduction)
            if reduction == "none":
                loss = loss.view(b, t)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW. Decayed: the 2-D weights of embeddings, attention and MLP (nanoGPT's rule) and
        the connections' dynamic projections (conn.decay_parameters()). Not decayed: norms,
        biases, and the connections' static coefficients and gates."""
        conn_params = {id(p) for c in self.connections() for p in c.parameters()}
        conn_decay = {id(p) for c in self.connections() for p in c.decay_parameters()}
        decay, no_decay = [], []
        for p in self.parameters():  # tied weights appear once
            if not p.requires_grad:
                continue
            if id(p) in conn_params:
                (decay if id(p) in conn_decay else no_decay).append(p)
            else:
                (decay if p.dim() >= 2 else no_decay).append(p)
        optim_groups = [
            {'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0},
        ]
        fused_available = 'fused' in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == 'cuda'
        extra_args = dict(fused=True) if use_fused else dict()
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)

    def estimate_flops_per_token(self, seq_len):
        """Model FLOPs per token of a training step (forward + backward): 6 x (parameters except
        position embeddings) + 12 x layers x d_model x seq_len (PaLM appendix B)."""
        cfg = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * seq_len

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens tokens after the context idx (LongTensor (b, t)); temperature 0 is greedy
        (the argmax at every step)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            if temperature == 0:
                idx = torch.cat((idx, logits[:, -1, :].argmax(-1, keepdim=True)), dim=1)
                continue
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('Inf')
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


# -----------------------------------------------------------------------------
# checkpoints (written by train.py; read by train.py --resume, sample.py and the evals)

class CheckpointError(ValueError):
    """A ckpt.pt that cannot be used: missing, truncated, not a checkpoint, or from another program."""


def load_checkpoint(path):
    """The dict train.py saved at path (a ckpt.pt or a run directory holding one), on the CPU.
    Raises CheckpointError naming the file and the fix instead of torch's or pickle's traceback."""
    import os
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: pass a ckpt.pt or the out_dir of a train.py run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, random bytes, a pickle of something else: all unusable
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); it may be truncated "
                              f"or not a train.py checkpoint: use another checkpoint (e.g. ckpt_<step>.pt in "
                              f"the same out_dir) or start the run afresh in a new out_dir") from None
    missing = [k for k in ("model", "model_config", "step") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a train.py checkpoint (no {', '.join(missing)}): pass the ckpt.pt "
                              f"that train.py wrote in a run's out_dir")
    return ckpt
