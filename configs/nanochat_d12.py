# KromHC's main setup: nanochat's d12 model and recipe as of karpathy/nanochat e1770a3 (2025-12-27:
# nanochat/gpt.py, nanochat/muon.py, scripts/base_train.py, scripts/tok_train.py) on FineWeb-Edu, with
# nanochat's own tokenizer. The pipeline (docs/reproduce-d12.md):
#   python data/tokenizer.py train fineweb_edu --max-chars 2000000000   # data/tokenizers/fineweb_edu-65536.tiktoken
#   python data/prepare.py fineweb_edu --tokenizer data/tokenizers/fineweb_edu-65536.tiktoken   # data/fineweb_edu-65536
#   torchrun --standalone --nproc_per_node=8 train.py configs/nanochat_d12.py --scheme=kromhc
# The scheme is an override (--scheme=plain is nanochat itself). configs/kromhc_d12.py: the recipe
# the KromHC paper states (nanochat of 2026-01-05).

# data: FineWeb-Edu sample-10BT (hcgpt's split), every document after <|bos|>, tokenized with a
# 65,536-token BPE trained as nanochat's tok_train.py (rustbpe, nanochat's split pattern and 9
# special tokens, documents cut to 10,000 characters, the first 2 B characters: speedrun.sh).
# --dataset=fineweb_edu trains on GPT-2's tokens instead (50,257 -> 50,304; loss not comparable).
dataset = "fineweb_edu-65536"

# model: depth 12, model_dim = 64 x depth, heads of 128, sequence 2048
arch = "nanochat"
n_layer = 12
n_embd = 768
n_head = 6
block_size = 2048
bias = False
dropout = 0.0
nanochat_init = "e1770a3"  # normal init, zero unembedding (nanochat until 2026-01-01)
embedding_dtype = "bfloat16"  # nanochat stores the token embedding in bf16 on CUDA (gpt.py init_weights)
scheme = "kromhc"  # KromHC's row of the table; any scheme works (--scheme=plain is nanochat itself)
n_streams = 0  # 0: 4 streams, 1 for plain

# optimizer: Muon (lr 0.02, momentum 0.85 -> 0.95 over 300 steps, no weight decay) for the blocks'
# matrices; AdamW (betas 0.8 / 0.95, eps 1e-10, no weight decay) for the embedding (0.2) and
# unembedding (0.004)
optimizer = "muon"
matrix_lr = 0.02
embedding_lr = 0.2
unembedding_lr = 0.004
muon_momentum_start = 0.85
muon_momentum = 0.95
muon_momentum_warmup = 300
muon_weight_decay = 0.0
beta1 = 0.8
beta2 = 0.95
adam_eps = 1e-10
weight_decay = 0.0
# The connections' own parameters: nanochat has none, and where KromHC put them is known only
# second-hand (configs/kromhc_d12.py: AdamW at 0.005). Here AdamW at the lr the same connections
# were trained with at 12 layers / 768 wide in the mHC-lite grid (configs/fwe_m.py).
hc_optimizer = "adamw"
learning_rate = 6e-4
grad_clip = 1.0

# 524,288 tokens per step: 16 x 2,048 per GPU x 8 GPUs x 2 micro-steps (nanochat: 32 x 2,048 x 8)
total_batch_tokens = 524_288
batch_size = 16

# steps: nanochat's data : parameter ratio of 20 over ALL parameters (base_train.py: num_iterations
# = 20 x num_params // total_batch_size), counted for the model train.py builds (train.ratio_steps),
# so each scheme gets its own budget. At 65,536 tokens (tests/test_reproduce_d12.py checks these):
#   plain 185,597,952 params -> 7,080 steps | hc 185,727,600 -> 7,084 | mhc 187,441,800 -> 7,150
#   mhc_lite 188,031,816 -> 7,172 | kromhc 186,556,776 -> 7,116   (n = 4, 524,288 tokens per step)
# At GPT-2's 50,304: plain 162,201,600 -> 6,187 | kromhc 163,160,424 -> 6,224.
# --max_iters=N overrides the rule (e.g. a short trial).
max_iters = -1
param_data_ratio = 20

# schedule: no warmup, constant, then linear to 0 over the final 20% of the steps (nanochat's
# warmdown_ratio 0.2, final_lr_frac 0.0), every group's lr multiplied alike
lr_schedule = "linear"
warmup_iters = 0
lr_decay_iters = 0
warmdown_frac = 0.2
min_lr_ratio = 0.0

# evaluation: val BPB every 250 steps over 20 x 524,288 tokens; HellaSwag and CORE (all items:
# base_eval.py; --core_max_per_task=500 for base_train.py's variant) once at the end when their
# data is on this machine (else a note in the log)
eval_interval = 250
eval_tokens = 20 * 524_288
final_hellaswag = True
final_core = True
core_max_per_task = -1
