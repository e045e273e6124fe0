# A sweep that fits a laptop: the quickstart model shrunk (2 layers, 64 wide, context 64) on pydocs,
# 60 steps of 1,024 tokens. Far too small to rank the schemes (docs/comparisons.md: 150 steps of the
# 4-layer model do not), but every scheme's loss falls from 10.7 to about 5.8 and the sweep -> compare
# -> plot chain runs end to end in a few minutes (README, "A sweep on a laptop"):
#   python scripts/sweep.py --configs configs/laptop.py --schemes plain kromhc --seeds 3 --out_root out/laptop --run
dataset = "pydocs"
device = "cpu"

n_layer = 2
n_head = 2
n_embd = 64
block_size = 64
dropout = 0.0

batch_size = 16
total_batch_tokens = 1024  # one micro-step of 16 x 64
max_iters = 60
learning_rate = 3e-3
warmup_iters = 10
min_lr_ratio = 0.1
weight_decay = 0.1

eval_interval = 15  # 4 evals after step 0: the curves of the band plot
eval_tokens = 4096  # 64 fixed val windows of 64 tokens
log_interval = 10
