"""The optimizers and their schedules, with their config keys (OptimConfig).

    build          a model's optimizer: AdamW (nanoGPT's groups) or Muon + AdamW (nanochat's), every group
                   carrying base_lr, the peak lr the schedule multiplies
    lr_at          the lr of a group at a step: linear warmup, then cosine (or hold + linear warmdown) to min_lr
    muon_momentum  Muon's momentum warmup
    ratio_steps    nanochat's training horizon: steps = ratio x parameters // tokens per step
"""

import math
from dataclasses import dataclass

import torch

from errors import ConfigError
from keys import check, key

OPTIMIZERS = ("adamw", "muon")


def _steps(v):
    return None if v >= -1 else "an integer >= 0 (steps), or -1 for steps from 'param_data_ratio', got %r" % v


@dataclass
class OptimConfig:
    """How a run optimizes: the optimizer, its hyperparameters and the lr schedule (config keys of optim.py)."""
    SECTION = "optimizer and lr schedule (optim.py)"
    optimizer: str = key("adamw", "adamw (everything on AdamW) | muon (Muon for the blocks' matrices, AdamW for the "
                         "rest; arch=nanochat)", choices=OPTIMIZERS)
    learning_rate: float = key(6e-4, "peak lr; adamw: every parameter; muon: the connections' AdamW parameters",
                               at_least=0.0)
    max_iters: int = key(10_000, "optimizer steps in the run; -1 -> from param_data_ratio (nanochat's "
                         "num_iterations=-1)", check=_steps)
    param_data_ratio: float = key(20.0, "max_iters=-1: steps = ratio x all parameters // total_batch_tokens "
                                  "(nanochat's rule)", at_least=0.0, applies={"max_iters": (-1,)})
    weight_decay: float = key(0.1, "AdamW's, on its 2-D weights (muon: embedding, unembedding, connections' "
                              "projections)", at_least=0.0)
    beta1: float = key(0.9, "AdamW beta1", at_least=0.0, below=1.0)
    beta2: float = key(0.95, "AdamW beta2", at_least=0.0, below=1.0)
    adam_eps: float = key(1e-8, "AdamW eps (nanochat: 1e-10)", at_least=0.0)
    grad_clip: float = key(1.0, "max global gradient norm; 0 -> no clipping", at_least=0.0)
    lr_schedule: str = key("cosine", "cosine | linear (hold, then a linear warmdown)", choices=("cosine", "linear"))
    warmup_iters: int = key(200, "linear warmup steps", at_least=0)
    lr_decay_iters: int = key(0, "step at which the lr reaches min_lr; 0 -> max_iters", at_least=0)
    min_lr_ratio: float = key(0.1, "min_lr = learning_rate * min_lr_ratio", at_least=0.0, at_most=1.0)
    warmdown_frac: float = key(0.2, "linear: the final fraction of lr_decay_iters spent decaying", above=0.0,
                               at_most=1.0, applies={"lr_schedule": ("linear",)})
    # muon: nanochat's lrs; the AdamW ones are scaled by (n_embd / 768)^-0.5 as in nanochat
    matrix_lr: float = key(0.02, "Muon: the blocks' 2-D matrices", at_least=0.0, applies={"optimizer": ("muon",)})
    embedding_lr: float = key(0.2, "AdamW: the token embedding", at_least=0.0, applies={"optimizer": ("muon",)})
    unembedding_lr: float = key(0.004, "AdamW: lm_head", at_least=0.0, applies={"optimizer": ("muon",)})
    muon_momentum: float = key(0.95, "reached after muon_momentum_warmup steps ...", at_least=0.0, below=1.0,
                               applies={"optimizer": ("muon",)})
    muon_momentum_start: float = key(0.85, "... linearly from this one (nanochat: 0.85 -> 0.95 over 300 steps)",
                                     at_least=0.0, below=1.0, applies={"optimizer": ("muon",)})
    muon_momentum_warmup: int = key(300, "steps of the Muon momentum warmup", at_least=0,
                                    applies={"optimizer": ("muon",)})
    muon_weight_decay: float = key(0.0, "Muon's decoupled weight decay (p <- p (1 - lr wd)) on the blocks' matrices; "
                                   "nanochat: none", at_least=0.0, applies={"optimizer": ("muon",)})
    hc_optimizer: str = key("adamw", "muon: the connections' 2-D projections on adamw (learning_rate) | muon "
                            "(matrix_lr)", choices=OPTIMIZERS, applies={"optimizer": ("muon",)})

    def __post_init__(self):
        check(self)
        if self.max_iters == -1 and self.param_data_ratio <= 0:
            raise ConfigError("config key 'max_iters' is -1 (steps from 'param_data_ratio') but 'param_data_ratio' "
                              "is 0; set one of them")


# -----------------------------------------------------------------------------
# the schedules

def lr_at(step, oc, base_lr):
    """The lr at step of a group whose peak lr is base_lr."""
    warmup, decay_iters = oc.warmup_iters, oc.lr_decay_iters or oc.max_iters
    min_lr = base_lr * oc.min_lr_ratio
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if step >= decay_iters:
        return min_lr
    if oc.lr_schedule == "cosine":
        ratio = (step - warmup) / max(1, decay_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (base_lr - min_lr)
    start = max(warmup, decay_iters - round(oc.warmdown_frac * decay_iters))  # linear warmdown
    if step < start:
        return base_lr
    return base_lr + (step - start) / max(1, decay_iters - start) * (min_lr - base_lr)


def muon_momentum(step, oc):
    """Muon's momentum: muon_momentum_start -> muon_momentum linearly over muon_momentum_warmup steps."""
    frac = min(step / oc.muon_momentum_warmup, 1.0) if oc.muon_momentum_warmup else 1.0
    return (1 - frac) * oc.muon_momentum_start + frac * oc.muon_momentum


def ratio_steps(num_params, ratio, total_batch_tokens):
    """nanochat's training horizon (scripts/base_train.py, target_param_data_ratio): ratio x num_params
    tokens in whole steps, num_params counting every parameter (embedding, unembedding, the
    connections): 20 x 185,597,952 // 524,288 = 7,080 steps for nanochat's d12 at 65,536 tokens."""
    return int(ratio * num_params) // total_batch_tokens


# -----------------------------------------------------------------------------
# the optimizers

def build(model, oc, device_type):
    """The optimizer of model (a GPT) for OptimConfig oc: AdamW, or nanochat's Muon + AdamW."""
    return muon(model, oc, device_type) if oc.optimizer == "muon" else adamw(model, oc, device_type)


def adamw(model, oc, device_type):
    """AdamW. Decayed: the 2-D weights of embeddings, attention and MLP (nanoGPT's rule) and the
    connections' dynamic projections (conn.decay_parameters()), plus, with decay_static, the static
    coefficients the published code decays (conn.static_decay_parameters()). Not decayed: norms, biases,
    and the connections' other static coefficients and gates."""
    conn_params = {id(p) for c in model.hc_modules() for p in c.parameters()}
    conn_decay = model.connection_decay_ids()
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        if id(p) in conn_params:
            (decay if id(p) in conn_decay else no_decay).append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": oc.weight_decay, "base_lr": oc.learning_rate},
              {"params": no_decay, "weight_decay": 0.0, "base_lr": oc.learning_rate}]
    fused = dict(fused=True) if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=oc.learning_rate, betas=(oc.beta1, oc.beta2), eps=oc.adam_eps, **fused)


def muon(model, oc, device_type):
    """nanochat's optimizer (nanochat/gpt.py setup_optimizers), arch="nanochat" only:

        Muon  (lr matrix_lr, nesterov momentum, muon_weight_decay)  the blocks' 2-D matrices
        AdamW (betas, adam_eps, weight_decay), lr x (n_embd / 768)^-0.5  unembedding: unembedding_lr
                                                                          embedding:   embedding_lr
    The connections' parameters (their placement in KromHC's runs is not public), and hc_head's, go to
    AdamW at learning_rate, unscaled, weight decay on the dynamic projections only (hcgpt's AdamW rule);
    hc_optimizer="muon" moves their 2-D dynamic projections to Muon at matrix_lr. muon_weight_decay is
    torch's decoupled decay, p <- p (1 - lr wd) every step, on every Muon group (nanochat's own Muon decay,
    cautious and ramped, is another rule: docs/nanochat.md). Every group carries its name and base_lr."""
    if model.config.arch != "nanochat":
        raise ConfigError(f"config key 'optimizer' is 'muon', nanochat's optimizer, which takes arch='nanochat' (got "
                          f"arch={model.config.arch!r}: no lr for GPT-2's LayerNorms, biases and tied embedding); add "
                          f"--arch=nanochat or use --optimizer=adamw")
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"config key 'optimizer': 'muon' needs torch.optim.Muon, in torch >= 2.9; this is torch "
                          f"{torch.__version__}")
    conns = model.hc_modules()
    conn_ids = {id(p) for c in conns for p in c.parameters()}
    conn_decay = model.connection_decay_ids()
    conn_muon = [p for c in conns for p in c.decay_parameters() if p.dim() == 2] if oc.hc_optimizer == "muon" else []
    muon_ids = {id(p) for p in conn_muon}
    matrices = [p for p in model.transformer.h.parameters() if id(p) not in conn_ids]
    assert all(p.dim() == 2 for p in matrices)  # no norm weights, no biases: only matrices
    conn_rest = [p for c in conns for p in c.parameters() if id(p) not in muon_ids]
    scale = (model.config.n_embd / 768) ** -0.5  # nanochat tuned the AdamW lrs at 768 wide
    muon_groups = [dict(name="matrices", params=matrices, base_lr=oc.matrix_lr)]
    if conn_muon:
        muon_groups.append(dict(name="hc_matrices", params=conn_muon, base_lr=oc.matrix_lr))
    adamw_groups = [
        dict(name="unembedding", params=[model.lm_head.weight], base_lr=oc.unembedding_lr * scale,
             weight_decay=oc.weight_decay),
        dict(name="embedding", params=[model.transformer.wte.weight], base_lr=oc.embedding_lr * scale,
             weight_decay=oc.weight_decay),
        dict(name="hc_decay", params=[p for p in conn_rest if id(p) in conn_decay], base_lr=oc.learning_rate,
             weight_decay=oc.weight_decay),
        dict(name="hc", params=[p for p in conn_rest if id(p) not in conn_decay], base_lr=oc.learning_rate,
             weight_decay=0.0),
    ]
    adamw_groups = [g for g in adamw_groups if g["params"]]  # plain has no connection parameters
    for g in muon_groups + adamw_groups:
        g["lr"] = g["base_lr"]
    # torch's Muon: nesterov momentum, Newton-Schulz in bf16 with Keller Jordan's quintic coefficients,
    # lr x sqrt(max(1, rows / cols)) ("original"): nanochat's Muon; its default weight decay is 0.1, nanochat's none
    m = torch.optim.Muon(muon_groups, lr=oc.matrix_lr, weight_decay=oc.muon_weight_decay, momentum=oc.muon_momentum,
                         nesterov=True, adjust_lr_fn="original")
    fused = dict(fused=True) if device_type == "cuda" else {}
    a = torch.optim.AdamW(adamw_groups, lr=oc.embedding_lr, betas=(oc.beta1, oc.beta2), eps=oc.adam_eps, **fused)
    return MuonAdamW(m, a)


class MuonAdamW:
    """Muon and AdamW stepped as one optimizer: the interface train.py uses (param_groups, step,
    zero_grad, state_dict, load_state_dict). Muon's groups come first."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self):
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
