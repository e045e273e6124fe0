# mHC-lite paper grid, size M on fineweb_edu: 12 layers, d_model 768, lr 6e-4; the rest is shared
# (configs/mhclite_grid.py). The scheme is an override:
#   torchrun --standalone --nproc_per_node=8 train.py configs/fwe_m.py --scheme=kromhc
from configs.mhclite_grid import *  # noqa: F401,F403

dataset = "fineweb_edu"
n_layer = 12
n_head = 12
n_embd = 768
learning_rate = 6e-4
