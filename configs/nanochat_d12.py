# KromHC's main setup: nanochat's d12 model and recipe (karpathy/nanochat at e1770a3, 2025-12-27:
# nanochat/gpt.py, nanochat/muon.py, scripts/base_train.py) on FineWeb-Edu. The scheme is an override:
#   torchrun --standalone --nproc_per_node=8 train.py configs/nanochat_d12.py --scheme=kromhc
dataset = "fineweb_edu"  # nanochat trains on FineWeb-Edu; hcgpt's sample-10BT split, GPT-2 tokens

# model: depth 12, model_dim = 64 x depth, heads of 128, sequence 2048
arch = "nanochat"
n_layer = 12
n_embd = 768
n_head = 6
block_size = 2048
bias = False
dropout = 0.0
scheme = "kromhc"  # KromHC's row of the table; any scheme works (--scheme=plain is nanochat itself)
n_streams = 0  # 0: 4 streams, 1 for plain

# optimizer: Muon (lr 0.02, momentum 0.85 -> 0.95 over 300 steps) for the blocks' matrices; AdamW
# (betas 0.8 / 0.95, eps 1e-10, no weight decay) for the embedding (0.2) and unembedding (0.004)
optimizer = "muon"
matrix_lr = 0.02
embedding_lr = 0.2
unembedding_lr = 0.004
muon_momentum_start = 0.85
muon_momentum = 0.95
muon_momentum_warmup = 300
beta1 = 0.8
beta2 = 0.95
adam_eps = 1e-10
weight_decay = 0.0
# The connections' own parameters: where KromHC put them is not public. Here AdamW at the lr the
# same connections were trained with at 12 layers / 768 wide in the mHC-lite grid (configs/fwe_m.py);
# with no warmup and this warmdown their static logits can move by at most about
# 6e-4 x 0.9 x 6,187 = 3.3 in total, the same budget as in the grid's M runs (10,000 cosine steps).
hc_optimizer = "adamw"
learning_rate = 6e-4
grad_clip = 1.0

# 524,288 tokens per step: 16 x 2,048 per GPU x 8 GPUs x 2 micro-steps (nanochat: 32 x 2,048 x 8)
total_batch_tokens = 524_288
batch_size = 16

# steps: a data : parameter ratio of 20 over ALL parameters (nanochat at e1770a3: num_params =
# sum of every parameter; num_iterations = 20 x num_params // total_batch_size), here for hcgpt's
# vocabulary of 50,304 and nanochat's model (no connections, so the count is the same for every scheme):
#   embedding 50,304 x 768 + unembedding 768 x 50,304 = 77,266,944
#   12 blocks x (4 x 768^2 attention + 8 x 768^2 MLP) = 84,934,656
#   total 162,201,600; 20 x 162,201,600 // 524,288 = 6,187 steps (3.24 B tokens)
# (nanochat's 65,536 vocabulary: 185,597,952 parameters -> 7,080 steps)
max_iters = 6_187

# schedule: no warmup, constant, then linear to 0 over the final 20% of the steps (nanochat's
# warmdown_ratio 0.2, final_lr_frac 0.0), every group's lr multiplied alike
lr_schedule = "linear"
warmup_iters = 0
lr_decay_iters = 0
warmdown_frac = 0.2
min_lr_ratio = 0.0

# evaluation: val BPB every 250 steps over 20 x 524,288 tokens; HellaSwag and CORE (all items)
# once at the end when their data is on this machine (else a note in the log)
eval_interval = 250
eval_tokens = 20 * 524_288
final_hellaswag = True
final_core = True
core_max_per_task = -1
