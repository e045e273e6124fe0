# mHC-lite paper grid, size L on openwebtext: 24 layers, d_model 1024, lr 3e-4; the rest is shared
# (configs/mhclite_grid.py). The scheme is an override:
#   torchrun --standalone --nproc_per_node=8 train.py configs/owt_l.py --scheme=kromhc
from configs.mhclite_grid import *  # noqa: F401,F403

dataset = "openwebtext"
n_layer = 24
n_head = 16
n_embd = 1024
learning_rate = 3e-4
