"""Measure a checkpoint on code it never saw: bits per byte, next-line and FIM exact match.

    python evaluate.py --ckpt out-code-assistant                    # the dataset's held-out files
    python evaluate.py --ckpt out-code-assistant --src ~/code/other_repo --out eval.json

- bits per byte: cross-entropy of every token of each file, in bits, over the file's UTF-8 bytes
  (comparable across tokenizers).
- next-line exact match: given a file up to a line, does greedy decoding reproduce that line?
- FIM middle-line exact match: given the lines before and after, does it fill in the line?
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import CheckpointError, load_model
from engine import Engine, SamplingParams, build_prompt

log = logging.getLogger(__name__)


def held_out_files(ckpt_meta: dict, src: list[str] | None, data_dir: str | None) -> list[Path]:
    """Files from --src, or the val split recorded by collect_code.py for the checkpoint's data."""
    if src:
        files = []
        for d in src:
            p = Path(d)
            if not p.exists():
                raise FileNotFoundError(f"--src {d} does not exist")
            files += [p] if p.is_file() else sorted(p.rglob("*.py"))
        return files
    data_dir = data_dir or ckpt_meta.get("config", {}).get("data_dir") or "data/stdlib"
    listing = Path(data_dir) / "val_files.json"
    if not listing.exists():
        raise FileNotFoundError(f"no --src given and no {listing}")
    return [Path(p) for p in json.loads(listing.read_text())]


def read_texts(files: list[Path], limit: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    files = list(files)
    rng.shuffle(files)
    texts = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # unreadable held-out files are skipped, as collect_code does
        if len(text) >= 100:
            texts.append(text)
        if len(texts) >= limit:
            break
    return texts


@torch.no_grad()
def bits_per_byte(model, tokenizer, texts: list[str], max_tokens: int = 200_000) -> float:
    """Summed token NLL (bits) over summed UTF-8 bytes, windows of block_size with no overlap."""
    device = model.transformer.wte.weight.device
    block = model.config.block_size
    nll_nats, n_bytes, n_tokens = 0.0, 0, 0
    for text in texts:
        ids = [tokenizer.eot_id] + tokenizer.encode(text)
        ids = ids[: max_tokens - n_tokens + 1]
        if len(ids) < 2:
            break
        for start in range(0, len(ids) - 1, block):
            chunk = torch.tensor(ids[start: start + block + 1], device=device)
            logits, _ = model(chunk[None, :-1])
            nll_nats += F.cross_entropy(logits[0].float(), chunk[1:], reduction="sum").item()
        n_bytes += len(tokenizer.decode_bytes(ids[1:]))
        n_tokens += len(ids) - 1
        if n_tokens >= max_tokens:
            break
    return nll_nats / math.log(2) / max(n_bytes, 1)


def newline_token_ids(tokenizer) -> tuple[int, ...]:
    """Every token whose text contains a newline: decoding stops at the end of the line."""
    return tuple(i for i in range(tokenizer.n_vocab)
                 if i not in tokenizer.special_tokens.values() and b"\n" in tokenizer.decode_bytes([i]))


def line_cases(texts: list[str], n: int, seed: int) -> list[tuple[str, str, str]]:
    """(prefix, line, suffix) triples at random non-blank lines after the first few."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n * 20):
        text = rng.choice(texts)
        lines = text.split("\n")
        if len(lines) < 4:
            continue
        i = rng.randrange(2, len(lines) - 1)
        if not lines[i].strip():
            continue
        cases.append(("\n".join(lines[:i]) + "\n", lines[i], "\n" + "\n".join(lines[i + 1:])))
        if len(cases) >= n:
            break
    return cases


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip()


def exact_match(engine: Engine, tokenizer, cases, fim: bool, max_tokens: int = 48) -> float:
    stops = newline_token_ids(tokenizer) + (tokenizer.eot_id,)
    max_tokens = min(max_tokens, engine.max_seq_len // 2)  # leave room for the prompt
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=stops)
    budget = engine.max_seq_len - max_tokens
    prompts = [build_prompt(tokenizer, p, s if fim else None, budget) for p, _, s in cases]
    hits = 0
    batch = engine.max_batch
    for i in tqdm(range(0, len(prompts), batch), desc="fim" if fim else "next-line", leave=False):
        outs = engine.generate_batch(prompts[i: i + batch], params)
        for (_, line, _), out in zip(cases[i: i + batch], outs):
            hits += _first_line(tokenizer.decode(out)) == line.rstrip()
    return hits / max(len(cases), 1)


def next_line_exact_match(model, tokenizer, texts: list[str], n: int = 100, seed: int = 0) -> float:
    """Fraction of `n` held-out lines that greedy decoding reproduces from the lines above."""
    engine = Engine(model, max_batch=16, eos_id=tokenizer.eot_id, vocab_size=tokenizer.n_vocab)
    return exact_match(engine, tokenizer, line_cases(texts, n, seed), fim=False)


def evaluate(ckpt: str, files: list[Path], n_lines: int, n_files: int, seed: int,
             device: str) -> dict:
    model, tokenizer, meta = load_model(ckpt, device)
    texts = read_texts(files, n_files, seed)
    if not texts:
        raise FileNotFoundError("no readable held-out Python files")
    engine = Engine(model, max_batch=16, eos_id=tokenizer.eot_id, vocab_size=tokenizer.n_vocab)
    cases = line_cases(texts, n_lines, seed)
    return {
        "ckpt": ckpt,
        "files": len(texts),
        "bits_per_byte": bits_per_byte(model, tokenizer, texts),
        "next_line_exact_match": exact_match(engine, tokenizer, cases, fim=False),
        "fim_middle_line_exact_match": exact_match(engine, tokenizer, cases, fim=True),
        "lines": len(cases),
        "val_loss": meta.get("val_loss"),
        "step": meta.get("step"),
        "quantization": meta.get("quantization"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="out-code-assistant")
    ap.add_argument("--src", action="append", help="held-out code (default: the val split)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--lines", type=int, default=200)
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        from checkpoint import read_meta
        files = held_out_files(read_meta(args.ckpt), args.src, args.data_dir)
        result = evaluate(args.ckpt, files, args.lines, args.files, args.seed, args.device)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
