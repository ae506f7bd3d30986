# The chapter's recipe: fine-tune GPT-2 124M on your own Python code on one GPU.
#   python train.py config/train_code_assistant.py --dataset=python_code
# The dataset must be collected with the gpt2 tokenizer (collect_code.py --tokenizer=gpt2),
# because the pretrained weights only know GPT-2's token ids.
out_dir = "out-code-assistant"
eval_interval = 500
eval_iters = 100
log_interval = 10

dataset = "python_code"
batch_size = 8  # per GPU
gradient_accumulation_steps = 4  # 8 x 4 x 512 = 16k tokens per optimizer step
block_size = 512  # code needs more context than prose; crops GPT-2's 1024 positions

# GPT-2 small (124M); with init_from='gpt2' the shape comes from the pretrained weights
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.1
init_from = "gpt2"

# fine-tuning: about a tenth of a from-scratch learning rate, to keep what GPT-2 knows
learning_rate = 5e-5
max_iters = 5000
lr_decay_iters = 5000
min_lr = 5e-6
warmup_iters = 100
weight_decay = 0.1
grad_clip = 1.0
decay_lr = True

device = "cuda"
dtype = "float16"  # the chapter's choice (GradScaler on); bfloat16 is the better one on A100/H100
compile = True
