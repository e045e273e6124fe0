# GPT-2 124M on OpenWebText at nanoGPT's scale (train_gpt2.py): ~491,520 tokens per step,
# 600,000 steps (~300 B tokens), lr 6e-4 with 2,000 warmup steps and cosine to 6e-5.
#   torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m_owt.py --scheme=kromhc
dataset = "openwebtext"

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0
bias = True
scheme = "plain"

batch_size = 12  # per GPU: 12 x 1024 x 5 micro-steps x 8 GPUs = 491,520 tokens per step
total_batch_tokens = 491_520
max_iters = 600_000
learning_rate = 6e-4
beta1, beta2 = 0.9, 0.95
weight_decay = 0.1
grad_clip = 1.0
lr_schedule = "cosine"
warmup_iters = 2_000
min_lr_ratio = 0.1

eval_interval = 1_000
eval_tokens = 4_915_200  # 400 x 12 x 1024 val tokens
log_interval = 10
wandb_log = True
wandb_project = "hcgpt-gpt2-124m"
