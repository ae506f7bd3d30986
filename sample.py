"""Complete code with a trained checkpoint (float or quantized), through the inference engine.

    python sample.py --ckpt out-code-assistant --prompt "def fib(n):"
    python sample.py --ckpt out-code-assistant --prompt "def add(a, b):\\n    " --suffix "\\n\\nprint(add(1, 2))"
    python sample.py --ckpt out-code-assistant-int8-dynamic --prompt "import os" --temperature 0.8 --seed 1
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from checkpoint import CheckpointError, load_model
from engine import Engine, SamplingParams, build_prompt


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def unescape(text: str | None) -> str | None:
    """Shell arguments carry newlines as a literal backslash-n: turn them into real ones."""
    if text is None or "\\n" not in text:
        return text
    return text.encode().decode("unicode_escape")


def complete(engine: Engine, tokenizer, prefix: str, suffix: str | None, params: SamplingParams,
             max_prompt_tokens: int) -> str:
    """Decoded completion of `prefix` (filling up to `suffix` when given)."""
    ids = build_prompt(tokenizer, prefix, suffix, max_prompt_tokens)
    tokens = engine.generate(ids, params)
    if tokens and tokens[-1] == tokenizer.eot_id:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="out-code-assistant")
    ap.add_argument("--prompt", action="append", required=True,
                    help="code before the cursor; repeat for several completions")
    ap.add_argument("--suffix", default=None, help="code after the cursor (fill in the middle)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        model, tokenizer, meta = load_model(args.ckpt, resolve_device(args.device))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = Engine(model, max_batch=len(args.prompt), eos_id=tokenizer.eot_id,
                    vocab_size=tokenizer.n_vocab)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    max_prompt = engine.max_seq_len - args.max_tokens
    suffix = unescape(args.suffix)
    for prompt in map(unescape, args.prompt):
        text = complete(engine, tokenizer, prompt, suffix, params, max_prompt)
        print(f"----- {prompt!r}" + (f" ... {suffix!r}" if suffix else ""))
        print(prompt + text + (suffix or ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
