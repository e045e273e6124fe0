# mHC-lite paper grid, size S on openwebtext: 6 layers, d_model 512, lr 1e-3; the rest is shared
# (configs/mhclite_grid.py). The scheme is an override:
#   torchrun --standalone --nproc_per_node=8 train.py configs/owt_s.py --scheme=kromhc
from configs.mhclite_grid import *  # noqa: F401,F403

dataset = "openwebtext"
n_layer = 6
n_head = 8
n_embd = 512
learning_rate = 1e-3
