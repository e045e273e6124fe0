# Quickstart: a small KromHC GPT (n = 4 streams) on pydocs, on CPU in about 4 minutes on two cores.
#   python data/prepare.py pydocs && python train.py configs/quickstart.py
# Any key can be overridden, e.g. --scheme=mhc or --device=cuda.
dataset = "pydocs"
device = "cpu"

scheme = "kromhc"
n_streams = 4
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

eval_interval = 50
eval_tokens = 16_384  # 128 fixed val windows of 128 tokens
log_interval = 10
