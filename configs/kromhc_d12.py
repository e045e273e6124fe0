# The KromHC paper's stated D = 12 recipe (arXiv 2601.21579; its text read second-hand from
# teilomillet/kromcanon docs/REFERENCE.md, "Training Configuration (from paper)"), filled in with
# nanochat's d12 as of karpathy/nanochat ae0bf52 (2026-01-05 18:57; unchanged in gpt.py, muon.py,
# base_train.py and tok_train.py until ccf4b7f, 2026-01-07 22:11), the only nanochat state with the
# paper's 65,536-token vocabulary (186 M parameters at D = 12), data : parameter ratio 20 and 40%
# warmdown as defaults. Every value that differs from configs/nanochat_d12.py (e1770a3) names its source.
#   python data/tokenizer.py train fineweb_edu --max-chars 2000000000
#   python data/prepare.py fineweb_edu --tokenizer data/tokenizers/fineweb_edu-65536.tiktoken
#   torchrun --standalone --nproc_per_node=8 train.py configs/kromhc_d12.py --scheme=kromhc
# docs/reproduce-d12.md: what is equal to the paper's runs, and what is unknown.

# the model, data, batch, evaluation and step rule of nanochat's d12 (configs/nanochat_d12.py)
from configs.nanochat_d12 import *  # noqa: F401,F403

# init: uniform c_q/c_k/c_v/c_fc, unembedding std 0.001 (nanochat 48abd7d, 2026-01-01; in force at ae0bf52)
nanochat_init = "48abd7d"

# Muon: lr 0.02 (paper; nanochat's), weight decay 0.2 (paper: "Muon (LR=0.02, WD=0.2)"). nanochat at
# ae0bf52 has no Muon weight decay (its --weight_decay, default 0, is AdamW's on the embedding and
# unembedding); Muon's decay arrives in 2c4473d (2026-01-11, default 0.2 at d12) as a cautious decay
# ramped linearly to 0, a rule hcgpt does not have: here torch's decoupled p <- p (1 - lr wd)
matrix_lr = 0.02
muon_weight_decay = 0.2

# AdamW: the connections' parameters at lr 0.005, betas 0.8 / 0.95 (paper: "AdamW (LR=0.005,
# beta1=0.8, beta2=0.95) for HC params"); the betas are nanochat's for its AdamW groups too
hc_optimizer = "adamw"
learning_rate = 0.005
beta1 = 0.8
beta2 = 0.95
embedding_lr = 0.3  # nanochat ae0bf52 (0.2 -> 0.3); the paper is silent
unembedding_lr = 0.004  # nanochat; the paper is silent
weight_decay = 0.0  # AdamW's (nanochat's --weight_decay default until 2c4473d); the paper's 0.2 is Muon's

# schedule: the paper's "warmup 40% of total steps" read as nanochat's warmdown_ratio 0.4 (ae0bf52,
# 0.2 -> 0.4): no warmup, constant, then linear to 0 over the final 40%
warmup_iters = 0
warmdown_frac = 0.4
min_lr_ratio = 0.0
grad_clip = 1.0  # nanochat until 061f83c (2026-01-08)

# steps: token : parameter ratio about 20 (paper; nanochat's rule over every parameter, as above)
max_iters = -1
param_data_ratio = 20
