# The seeds comparison of docs/comparisons.md: the quickstart model (4L/128, 7.3M parameters, most of
# them the GPT-2 vocabulary's embedding) on pydocs, 150 steps of 2,048 tokens, one run in about
# 4 minutes on two idle CPU cores: the five schemes x 3 seeds in about an hour. The scheme, n and
# seeds come from the sweep:
#   python scripts/sweep.py --configs configs/seeds_pydocs.py --schemes plain hc mhc mhc_lite kromhc \
#       --seeds 3 --out_root out/seeds --run
dataset = "pydocs"
device = "cpu"

n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.0

batch_size = 16
total_batch_tokens = 2048  # one micro-step of 16 x 128
max_iters = 150
learning_rate = 2e-3
warmup_iters = 15
min_lr_ratio = 0.1
weight_decay = 0.1

eval_interval = 30  # 6 evals after step 0: the curves of the band plot
eval_tokens = 16_384  # 128 fixed val windows of 128 tokens
log_interval = 10
