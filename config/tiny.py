# A small CPU model that learns the Python standard library in ~4-5 minutes on 2 cores.
# Measured on 2 cores (~8-10k tok/s): 900 iters, fim_rate 0.5 -> val loss 4.39 (greedy output
# loops); 1500 iters, fim_rate 0.2 -> val loss 4.20 in 6 min. 1200 keeps `make demo` under 10 min.
#   python collect_code.py --out data/stdlib
#   python train.py config/tiny.py
# The vocabulary comes from the dataset (meta.json), padded to a multiple of 64.
out_dir = "out-code-assistant"
dataset = "stdlib"
init_from = "scratch"

n_layer = 4
n_head = 4
n_embd = 128
block_size = 256
dropout = 0.0  # a few minutes of training is far from overfitting

batch_size = 8
gradient_accumulation_steps = 1
max_iters = 1200
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 400
eval_iters = 10
log_interval = 20

# A fifth of the documents in fill-in-the-middle form: enough for `suffix` to work, while
# most of a few minutes of training goes to plain left-to-right code (what the demo prompts).
fim_rate = 0.2
fim_spm_rate = 0.5

device = "cpu"
dtype = "float32"
compile = False
