# The settings shared by the mHC-lite paper grid ({owt,fwe}_{s,m,l}.py import them and set the
# dataset, the size and the learning rate): 10,000 steps x 131,072 tokens, AdamW (0.9, 0.95),
# weight decay 0.1, warmup 200, cosine to lr/10, n = 4 streams (1 for plain). The model is the one
# the papers' numbers come from (the published mHC-lite nanoGPT fork, which KromHC plugs into):
block_size = 1024
dropout = 0.0
bias = False  # nanoGPT train.py's default, which no config of the published grid overrides (plain too)
n_streams = 0  # 0: 4 for hc / mhc / mhc_lite / kromhc / mhc_v4, 1 for plain
readout = "norm_sum"  # its model.py applies ln_f to every stream and sums them (logits ~n x larger at init)
decay_static = True  # its optimizer decays every parameter with dim >= 2, incl. hc's and mhc's static_alpha
sinkhorn_end = "cols"  # its mhc.py normalises alpha[in, out] ending on the input side: columns of H_res exact
stream_dtype = "bfloat16_hc"  # under bf16 autocast its n-stream mixing rounds the streams to bf16; plain stays fp32

batch_size = 16  # per GPU; gradient accumulation makes up total_batch_tokens on any number of GPUs
total_batch_tokens = 131_072
max_iters = 10_000
beta1, beta2 = 0.9, 0.95
weight_decay = 0.1
grad_clip = 1.0
lr_schedule = "cosine"
warmup_iters = 200
min_lr_ratio = 0.1

eval_interval = 500
eval_tokens = 10_485_760
log_interval = 10
wandb_log = True
wandb_project = "hcgpt-mhclite-grid"
