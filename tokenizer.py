"""Tokenizers for code-assistant: a byte-level BPE trained on your own code, or GPT-2's.

Both kinds end up as a `tiktoken.Encoding` (fast Rust encode/decode) wrapped in a
`CodeTokenizer` that knows the four special tokens the model uses:

    <|endoftext|>   document separator (and the end of a completion)
    <fim_prefix> <fim_middle> <fim_suffix>   fill-in-the-middle sentinels

The default "bpe" kind is trained with HF `tokenizers` (quick to train) and then converted
into tiktoken mergeable ranks (quick to use). A tokenizer directory holds

    tokenizer.json       {"kind", "pat_str", "special_tokens", "ranks_file", "n_vocab"}
    tokenizer.tiktoken   the ranks, one "base64(token bytes) rank" per line (tiktoken's format)

so a checkpoint directory is self-contained and loads offline, for both kinds.

Usage:
    from tokenizer import train_bpe, load_tokenizer
    tok = train_bpe(texts, vocab_size=4096)
    tok.save("data/mycode")
    tok = load_tokenizer("data/mycode")
    ids = tok.encode("def f(x):\\n    return x\\n")

    # quick check from the shell: train on the standard library and report compression
    python tokenizer.py --vocab-size 4096
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import tiktoken

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>")
TOKENIZER_FILE = "tokenizer.json"
RANKS_FILE = "tokenizer.tiktoken"
KINDS = ("bpe", "gpt2")

# GPT-2's pre-tokenizer split (tiktoken's r50k pattern). The HF trainer is given exactly this
# regex too, so the merges are learned on the same pieces tiktoken will later feed them.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# GPT-2 reserves 50256 for <|endoftext|>; the FIM tokens go right after it.
GPT2_N_RANKS = 50256
# Long enough for a real download on a slow link, short enough that an offline machine fails fast.
GPT2_FETCH_TIMEOUT_S = 5.0


class TokenizerError(RuntimeError):
    """A tokenizer directory that is missing, corrupt or inconsistent."""


class TokenizerUnavailable(RuntimeError):
    """The GPT-2 BPE files are neither cached nor downloadable (typically: offline)."""



class TokenizerLike(Protocol):
    """What FIM data and the server need of a tokenizer: CodeTokenizer, or a backend's own."""
    eot_id: int
    fim_prefix_id: int
    fim_middle_id: int
    fim_suffix_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

class CodeTokenizer:
    """A tiktoken Encoding plus the ids of our special tokens.

    encode() never produces special ids: text that merely *contains* "<|endoftext|>" (code
    about tokenizers does) is encoded as ordinary text. Special ids are inserted by the
    caller (collect_code.py between documents, the FIM transform, the sampler).
    """

    def __init__(self, kind: str, ranks: dict[bytes, int], pat_str: str,
                 special_tokens: dict[str, int]) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {kind!r}, expected one of {KINDS}")
        if tuple(special_tokens) != SPECIAL_TOKENS:
            raise ValueError(f"special tokens must be {SPECIAL_TOKENS}, got {tuple(special_tokens)}")
        self.kind = kind
        self.ranks = ranks
        self.pat_str = pat_str
        self.special_tokens = dict(special_tokens)
        self.enc = tiktoken.Encoding(
            name=f"code-assistant-{kind}-{len(ranks)}",
            pat_str=pat_str,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.eot_id = self.special_tokens["<|endoftext|>"]
        self.fim_prefix_id = self.special_tokens["<fim_prefix>"]
        self.fim_middle_id = self.special_tokens["<fim_middle>"]
        self.fim_suffix_id = self.special_tokens["<fim_suffix>"]
        self.n_vocab = self.enc.n_vocab

    def __repr__(self) -> str:
        return f"CodeTokenizer(kind={self.kind!r}, n_vocab={self.n_vocab})"

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # tiktoken releases the GIL and encodes the batch on a thread pool
        return self.enc.encode_ordinary_batch(list(texts), num_threads=max(1, os.cpu_count() or 1))

    def decode(self, ids: list[int]) -> str:
        # "replace": a completion cut mid-way through a multi-byte character must still print
        return self.enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer.tiktoken into `directory`, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n"
                 for tok, rank in sorted(self.ranks.items(), key=lambda kv: kv[1])]
        # ranks first: a tokenizer.json must never point at a ranks file that isn't complete
        _atomic_write_text(directory / RANKS_FILE, "".join(lines))
        meta = {
            "kind": self.kind,
            "pat_str": self.pat_str,
            "special_tokens": self.special_tokens,
            "ranks_file": RANKS_FILE,
            "n_vocab": self.n_vocab,
        }
        _atomic_write_text(directory / TOKENIZER_FILE, json.dumps(meta, indent=2) + "\n")


def build_prompt(tokenizer, prefix: str, suffix: str | None = None,
                 max_prompt_tokens: int | None = None) -> list[int]:
    """Token ids for a completion at the cursor: plain prefix, or a PSM fill-in-the-middle prompt.

    Over max_prompt_tokens, keep the text nearest the cursor: the end of the prefix and the
    start of the suffix (the suffix gets at most a third of the budget)."""
    prefix_ids = tokenizer.encode(prefix)
    if suffix is None:
        if max_prompt_tokens is not None and len(prefix_ids) > max_prompt_tokens:
            prefix_ids = prefix_ids[-max_prompt_tokens:]
        return prefix_ids
    suffix_ids = tokenizer.encode(suffix)
    if max_prompt_tokens is not None:
        budget = max_prompt_tokens - 3  # the three FIM control tokens
        if budget < 1:
            raise ValueError("max_prompt_tokens too small for a fill-in-the-middle prompt")
        if len(prefix_ids) + len(suffix_ids) > budget:
            keep_suffix = min(len(suffix_ids), max(budget // 3, budget - len(prefix_ids)))
            suffix_ids = suffix_ids[:keep_suffix]
            prefix_ids = prefix_ids[len(prefix_ids) - (budget - keep_suffix):] if budget > keep_suffix else []
    return ([tokenizer.fim_prefix_id] + prefix_ids + [tokenizer.fim_suffix_id] + suffix_ids
            + [tokenizer.fim_middle_id])


def padded_vocab_size(n_vocab: int, multiple: int = 64) -> int:
    """Round the vocab up to a multiple of `multiple` (GPU matmuls like round shapes)."""
    if n_vocab < 1 or multiple < 1:
        raise ValueError(f"n_vocab and multiple must be positive, got {n_vocab}, {multiple}")
    return (n_vocab + multiple - 1) // multiple * multiple


# -----------------------------------------------------------------------------
# byte-level BPE trained with HF tokenizers, converted to tiktoken ranks

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which HF's ByteLevel alphabet uses.

    Printable Latin-1 bytes stand for themselves; the others (control chars, space, ...)
    are moved to code points 256+ so that every token is a visible, whitespace-free string.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {ch: b for b, ch in _bytes_to_unicode().items()}


def _hf_token_to_bytes(token: str) -> bytes:
    try:
        return bytes(_UNICODE_TO_BYTE[ch] for ch in token)
    except KeyError as e:
        raise ValueError(f"token {token!r} is not in the byte-level alphabet") from e


def train_bpe(texts: Iterable[str], vocab_size: int) -> CodeTokenizer:
    """Train a byte-level BPE on `texts`; `vocab_size` counts the 4 special tokens.

    A small corpus may run out of pairs worth merging (min frequency 2), so the result can
    be smaller than asked; n_vocab tells the truth.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size must be at least {256 + n_special} (256 bytes + "
                         f"{n_special} special tokens), got {vocab_size}")
    hf = Tokenizer(models.BPE())
    # Split with our regex, then map bytes to the printable alphabet without a second split.
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_special,
        min_frequency=2,
        # all 256 bytes, even ones the corpus never uses, so any string round-trips
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    hf.train_from_iterator(_nonempty(texts), trainer=trainer)

    # HF numbers the alphabet first, then each merge in the order it was learned; tiktoken
    # merges by lowest rank, so the rank order must be that merge order. Single bytes get
    # ranks 0..255 by byte value (their rank never decides a merge).
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    for token, _ in sorted(hf.get_vocab().items(), key=lambda kv: kv[1]):
        piece = _hf_token_to_bytes(token)
        if piece not in ranks:  # two merges can spell the same bytes; the first one wins
            ranks[piece] = len(ranks)
    special = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    tok = CodeTokenizer("bpe", ranks, GPT2_PAT_STR, special)
    log.info("trained byte-level BPE: %d ranks + %d special = %d tokens",
             len(ranks), n_special, tok.n_vocab)
    return tok


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


# -----------------------------------------------------------------------------
# GPT-2

@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # tiktoken calls requests.get() without a timeout; urllib3 then falls back to the socket
    # default, so a default bounds the download. (Process-wide: don't call this concurrently.)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def gpt2_tokenizer() -> CodeTokenizer:
    """GPT-2's BPE with <|endoftext|>=50256 and the FIM tokens at 50257..50259 (n_vocab 50260).

    tiktoken downloads the BPE files unless TIKTOKEN_CACHE_DIR already holds them; offline
    this raises TokenizerUnavailable within a few seconds instead of hanging.
    """
    try:
        with _socket_timeout(GPT2_FETCH_TIMEOUT_S):
            base = tiktoken.get_encoding("gpt2")
        # the documented way to extend an encoding is to reuse its ranks and pattern
        ranks = dict(base._mergeable_ranks)
        pat_str = base._pat_str
    except Exception as e:  # requests/urllib3/OSError/hash mismatch: all mean "no usable files"
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "<unset>")
        raise TokenizerUnavailable(
            f"the gpt2 tokenizer files could not be fetched ({type(e).__name__}); this machine "
            f"seems offline: set TIKTOKEN_CACHE_DIR (now {cache}) to a directory holding "
            f"tiktoken's cached gpt2 files, or use the default bpe tokenizer") from e
    return _gpt2_from_ranks(ranks, pat_str)


def _gpt2_from_ranks(ranks: dict[bytes, int], pat_str: str) -> CodeTokenizer:
    n = len(ranks)
    special = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
    return CodeTokenizer("gpt2", ranks, pat_str, special)


# -----------------------------------------------------------------------------
# loading

def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as e:
                raise TokenizerError(f"corrupt ranks file {path}: line {lineno}: {e}") from None
    return ranks


def load_tokenizer(directory: str | Path) -> CodeTokenizer:
    """Load what CodeTokenizer.save wrote; TokenizerError (naming the path) if it can't."""
    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"no tokenizer at {path} (expected {TOKENIZER_FILE} written by "
                             f"collect_code.py)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"corrupt tokenizer file {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
        raise TokenizerError(f"corrupt tokenizer file {path}: missing or unknown 'kind'")
    kind = meta["kind"]
    special = meta.get("special_tokens")
    if not isinstance(special, dict) or tuple(special) != SPECIAL_TOKENS:
        raise TokenizerError(f"corrupt tokenizer file {path}: special_tokens must be "
                             f"{SPECIAL_TOKENS}")

    ranks_path = directory / str(meta.get("ranks_file") or RANKS_FILE)
    if not ranks_path.exists():
        if kind == "gpt2":
            # older/slim directories: fall back to tiktoken's cache (may raise TokenizerUnavailable)
            return gpt2_tokenizer()
        raise TokenizerError(f"tokenizer {path} needs its ranks file {ranks_path}, which is missing")
    ranks = _read_ranks(ranks_path)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"corrupt ranks file {ranks_path}: ranks are not 0..{len(ranks) - 1}")
    if kind == "bpe" and any(bytes([b]) not in ranks for b in range(256)):
        raise TokenizerError(f"corrupt ranks file {ranks_path}: not all 256 bytes are tokens")
    try:
        tok = CodeTokenizer(kind, ranks, str(meta.get("pat_str") or GPT2_PAT_STR),
                            {s: int(i) for s, i in special.items()})
    except (ValueError, TypeError) as e:
        raise TokenizerError(f"corrupt tokenizer {path}: {e}") from None
    if meta.get("n_vocab") not in (None, tok.n_vocab):
        raise TokenizerError(f"corrupt tokenizer {path}: n_vocab {meta['n_vocab']} but the files "
                             f"give {tok.n_vocab}")
    return tok


def _atomic_write_text(path: Path, text: str) -> None:
    # tmp in the same directory so os.replace is a rename, never a copy across filesystems
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes 0600 files; give the result the mode a plain open() would
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


if __name__ == "__main__":
    import argparse
    import sysconfig
    import time

    parser = argparse.ArgumentParser(description="train a BPE on the stdlib and report bytes/token")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-files", type=int, default=400)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[: args.max_files]
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    t0 = time.time()
    tok = train_bpe(docs, args.vocab_size)
    n_tokens = sum(map(len, tok.encode_batch(docs)))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    log.info("%d files, %d tokens, %.2f bytes/token, %.1fs", len(docs), n_tokens,
             n_bytes / max(1, n_tokens), time.time() - t0)
