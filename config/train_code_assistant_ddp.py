# The chapter's DDP recipe: 4 GPUs, 16 sequences per GPU per micro-step, 2 micro-steps.
#   torchrun --standalone --nproc_per_node=4 train.py config/train_code_assistant_ddp.py
# gradient_accumulation_steps is GLOBAL (nanoGPT's convention): train.py divides it by the
# number of processes. The chapter's "accum 2 per GPU on 4 GPUs" is therefore 8 here, a
# global batch of 16 x 8 x 512 = 64k tokens per step (4x the single-GPU recipe's 16k).
# On N GPUs with N dividing 8 the global batch stays the same; each GPU does 8/N micro-steps.
from configurator import load_recipe as _load_recipe
from pathlib import Path as _Path

globals().update(_load_recipe(_Path(__file__).with_name("train_code_assistant.py")))

batch_size = 16
gradient_accumulation_steps = 8  # = 2 per GPU x 4 GPUs
