# GPT-2 small's shape trained from scratch on your code with our own BPE tokenizer.
#   python collect_code.py --out data/python_code
#   python train.py config/train_code_assistant_scratch.py
from configurator import load_recipe as _load_recipe
from pathlib import Path as _Path

globals().update(_load_recipe(_Path(__file__).with_name("train_code_assistant.py")))

init_from = "scratch"
# from scratch wants a ~10x larger learning rate than fine-tuning, and a longer warmup
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 200
dtype = "bfloat16"  # no GradScaler needed; use float16 on GPUs without bf16
