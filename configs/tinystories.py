# TinyStories (Eldan & Li 2023, arXiv 2305.07759): the shape of the paper's 8-layer, 512-wide model (released
# as TinyStories-28M; 16 heads of 32) with its context length of 512 tokens (the authors' model cards:
# context_length=512, AdamW betas 0.9 / 0.95, weight decay 0.1). The paper finds models of this size and
# smaller (below 10 M parameters, or one block) fluent and consistent. Differences from its models, all
# hcgpt's: GPT-2 blocks with global attention in every layer (GPT-Neo alternates global and 256-token local
# attention), the GPT-2 BPE (the paper's parameter counts assume GPT-Neo's 10 K most frequent tokens; here the
# tied 50,304-row table adds 25.8 M), and a cosine schedule over 655 M tokens. The scheme is a key:
#   python data/prepare.py tinystories
#   python train.py configs/tinystories.py --scheme=plain
#   torchrun --standalone --nproc_per_node=8 train.py configs/tinystories.py --scheme=mhc
#   python scripts/sweep.py --preset tinystories              # the five schemes, n = 4
#   python scripts/eval_stories.py out/tinystories-kromhc-n4-s1337 --dry-run
dataset = "tinystories"

scheme = "kromhc"
n_streams = 0  # 0: 4 streams for hc / mhc / mhc_lite / kromhc, 1 for plain
n_layer = 8
n_head = 16
n_embd = 512
block_size = 512
dropout = 0.0

batch_size = 32  # per GPU; gradient accumulation makes up total_batch_tokens on 1, 2, 4 or 8 GPUs
total_batch_tokens = 131_072  # 256 stories' worth of 512-token windows per step
max_iters = 5_000
learning_rate = 1e-3
beta1, beta2 = 0.9, 0.95
weight_decay = 0.1
grad_clip = 1.0
lr_schedule = "cosine"
warmup_iters = 200
min_lr_ratio = 0.1

eval_interval = 500
eval_tokens = 1_048_576  # 2,048 fixed windows of the validation split (about 22 K stories in all)
log_interval = 10
wandb_project = "hcgpt-tinystories"
