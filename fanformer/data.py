"""Text in, tokens out: reading corpora, the memory-mapped token cache, batches, bits per byte.

Inputs are .txt files, folders of them, or JSON Lines with a `text` field. Each .txt file
and each JSON Lines record is one document; documents are tokenized once, joined with
`<|endoftext|>` after each, and written to a flat memory-mapped array (`TokenCache`), so a
training run of any length reads tokens without holding the corpus in memory. Batches are
fixed-length windows of that stream (no padding); which windows a step reads is a pure
function of (seed, sample index), so a resumed run reads exactly what the uninterrupted
run would have, and each data-parallel rank takes its own slice of every global batch.

With document masking (`fanformer-train --document_mask`) a window's positions restart
after every EOS (`document_positions`), and the model attends within documents only.

Bits per byte (total negative log-likelihood in nats / (ln 2 x UTF-8 bytes of the text))
compares models whose tokenizers differ, which per-token perplexity cannot. This module
knows nothing about optimizers or serving; `train.py` and `quant` call it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fanformer.model import FANformer
from fanformer.tokenizer import Tokenizer

EVAL_TEXT = Path(__file__).resolve().parent / "assets" / "eval.txt"
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CACHE_VERSION = 1
_CHUNK_CHARS = 1 << 20  # tokenize long documents in ~1 MB pieces cut at line ends


class DataError(Exception):
    """Bad training input; the message is one sentence for the user."""


# ---- reading corpora ----
def resolve_files(paths: list[str | Path]) -> list[Path]:
    """Expand folders (recursively, sorted) into text/JSONL files; fail on missing or empty."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise DataError(f"folder {path} holds no .txt or .jsonl files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"training input {path} does not exist")
    for file in files:
        if file.stat().st_size == 0:
            raise DataError(f"training input {file} is empty")
    if not files:
        raise DataError("no training input given")
    return files


def iter_documents(files: list[Path]) -> Iterator[str]:
    """One string per document: a whole text file, or one JSON Lines record's `text`."""
    for file in files:
        if file.suffix.lower() in JSONL_SUFFIXES:
            with open(file, encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{file}:{number} is not valid JSON ({e.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise DataError(f"{file}:{number} has no string field 'text'")
                    yield record["text"]
        else:
            yield file.read_text(encoding="utf-8", errors="replace")


def iter_lines(files: list[Path]) -> Iterator[str]:
    """The corpus as lines, for tokenizer training (which must not hold it all at once)."""
    for doc in iter_documents(files):
        yield from doc.splitlines(keepends=True)


def _pieces(doc: str) -> Iterator[str]:
    """Cut a long document at line ends into ~1 MB pieces so encoding streams."""
    start = 0
    while start < len(doc):
        end = doc.find("\n", start + _CHUNK_CHARS)
        end = len(doc) if end < 0 else end + 1
        yield doc[start:end]
        start = end


# ---- the token cache ----
class TokenCache:
    """A flat array of token ids on disk (uint16 when the vocabulary fits, else uint32)."""

    def __init__(self, path: Path):
        meta = json.loads(path.with_suffix(".json").read_text())
        self.path, self.meta = path, meta
        self.tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r",
                                shape=(meta["n_tokens"],))

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, files: list[Path], tokenizer: Tokenizer, cache_dir: str | Path,
              name: str = "train", show_progress: bool = True) -> TokenCache:
        """Tokenize `files` once (EOS after every document); reuse the cache if it is current."""
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        key = _cache_key(files, tokenizer)
        path = cache_dir / f"{name}-{key}.bin"
        if path.is_file() and path.with_suffix(".json").is_file():
            return cls(path)
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
        for stale in cache_dir.glob(f".{path.name}.tmp-*"):  # left by a killed build
            if not _pid_alive(stale.name.rsplit("-", 1)[1]):
                stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        total = sum(f.stat().st_size for f in files)
        n_tokens = n_docs = 0
        with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                          desc=f"tokenizing {name}",
                                          disable=not show_progress) as bar:
            for doc in iter_documents(files):
                for piece in _pieces(doc):
                    ids = np.asarray(tokenizer.encode(piece), dtype=dtype)
                    out.write(ids.tobytes())
                    n_tokens += len(ids)
                    bar.update(len(piece.encode("utf-8")))
                out.write(np.asarray([tokenizer.eos_id], dtype=dtype).tobytes())
                n_tokens += 1
                n_docs += 1
        if n_tokens <= n_docs:
            tmp.unlink()
            raise DataError(f"the {name} input holds no text")
        meta = {"version": CACHE_VERSION, "dtype": np.dtype(dtype).name, "n_tokens": n_tokens,
                "n_documents": n_docs, "sources": [str(f) for f in files]}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
        os.replace(tmp, path)  # the .bin appears last, so a present .bin is a complete cache
        return cls(path)


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _cache_key(files: list[Path], tokenizer: Tokenizer) -> str:
    """The inputs' contents (in order) and the tokenizer, not paths or times: a corpus that
    was copied, moved or re-mounted keeps its cache. Hashing reads each file once, far
    faster than tokenizing it."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for f in files:
        with open(f, "rb") as data:
            h.update(hashlib.file_digest(data, "sha256").digest())
    h.update(tokenizer.backend.to_str().encode())
    return h.hexdigest()[:16]


def split_tokens(tokens: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the last `eval_fraction` of the stream (views into the memmap, no copy)."""
    n_eval = int(len(tokens) * eval_fraction)
    return tokens[: len(tokens) - n_eval], tokens[len(tokens) - n_eval:]


# ---- batches ----
class PackedBatches:
    """Fixed windows of `seq_len + 1` tokens over the packed stream, reshuffled each epoch.

    Window w covers tokens [w*seq_len, w*seq_len + seq_len]; consecutive windows share one
    token so every token is a target once per epoch. Sample index g (counted over the
    whole run) maps to epoch g // n_windows and a seeded permutation of that epoch, so the
    data position is one integer and any rank can compute any sample.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _window(self, sample: int) -> int:
        epoch, index = divmod(sample, self.n_windows)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_epoch, self._perm = epoch, rng.permutation(self.n_windows)
        return int(self._perm[index])

    def batch(self, first_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples first_sample .. first_sample+batch_size-1 -> inputs, targets (B, T) int64."""
        rows = []
        for g in range(first_sample, first_sample + batch_size):
            start = self._window(g) * self.seq_len
            rows.append(np.asarray(self.tokens[start: start + self.seq_len + 1], dtype=np.int64))
        batch = torch.from_numpy(np.stack(rows))  # (B, T+1)
        return batch[:, :-1], batch[:, 1:]

    def rank_batch(self, step: int, micro: int, rank: int, micro_batch: int, accum: int,
                   world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch `micro` of optimizer step `step` (its shard of the data)."""
        global_batch = micro_batch * accum * world
        first = step * global_batch + (micro * world + rank) * micro_batch
        return self.batch(first, micro_batch)


def document_positions(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Positions (B, T) that restart at 0 after every EOS in ids (B, T).

    The EOS belongs to the document it ends, so the token after it is position 0 of the
    next one; the window's first token is position 0 too (its document's earlier text lies
    outside the window). Handed to the model, they make attention block-diagonal per
    document (`fanformer.model.document_mask`); a window without EOS gets 0..T-1.
    """
    T = ids.shape[-1]
    index = torch.arange(T, device=ids.device).expand_as(ids)  # (B, T)
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, :-1] == eos_id
    first = torch.where(starts, index, 0).cummax(dim=-1).values  # each token's document start
    return index - first


# ---- held-out text ----
GUTENBERG_CREDIT = "Produced by "


def strip_gutenberg(text: str) -> str:
    """`text` without Project Gutenberg's transcriber credits, the one rule every score
    of eval.txt applies (`read_eval_text`).

    eval.txt is two Gutenberg books with the license header and footer already cut; what
    is left of the boilerplate is one credit paragraph at the head of each book
    ("Produced by an anonymous Project Gutenberg volunteer and Jose Menendez", "Produced by
    David Widger. ..."). Rule: drop every paragraph (lines up to a blank line) whose first
    line starts with "Produced by ", and the blank lines it leaves at the very start.
    """
    paragraphs = text.split("\n\n")
    kept = [p for p in paragraphs if not p.lstrip("\n").startswith(GUTENBERG_CREDIT)]
    return "\n\n".join(kept).lstrip("\n")


def read_eval_text(path: str | Path = EVAL_TEXT) -> str:
    """A held-out text as scored by every bits/byte evaluation of a file (the quant report,
    bench/quant_quality.py): read as UTF-8, Gutenberg credits stripped (`strip_gutenberg`)."""
    return strip_gutenberg(Path(path).read_text(encoding="utf-8", errors="replace"))


# ---- evaluation ----
def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (special tokens: 0), from the byte-level vocab.

    In byte-level BPE every byte is one character of the token's string, so the string's
    length is its byte count; summing over predicted tokens gives the bytes of the text.
    """
    lengths = torch.zeros(tokenizer.vocab_size, dtype=torch.int64)
    for token, index in tokenizer.backend.get_vocab(with_added_tokens=False).items():
        lengths[index] = len(token)
    for index in tokenizer.special_ids:
        lengths[index] = 0
    return lengths


@torch.no_grad()
def evaluate_tokens(model: FANformer, tokens: np.ndarray, byte_lengths: torch.Tensor,
                    seq_len: int, batch_size: int = 8, max_tokens: int | None = None,
                    autocast_dtype: torch.dtype | None = None,
                    eos_id: int | None = None) -> dict[str, float]:
    """Cross-entropy (nats/token) and bits/byte over non-overlapping windows of `tokens`.

    With `eos_id`, positions restart after each EOS (document-masked attention, as
    `--document_mask` trains); without, attention is plain causal over each window.
    """
    ids = torch.from_numpy(np.asarray(tokens[: (max_tokens or len(tokens)) + 1], np.int64))
    device = model.embed.weight.device
    was_training = model.training
    model.eval()
    nll, count, n_bytes = 0.0, 0, 0
    starts = list(range(0, len(ids) - 1, seq_len))
    for i in range(0, len(starts), batch_size):
        group = [ids[s: s + seq_len + 1] for s in starts[i: i + batch_size]]
        width = max(len(w) for w in group)
        batch = torch.stack([F.pad(w, (0, width - len(w)), value=-100) for w in group])
        batch = batch.to(device)
        inputs, targets = batch[:, :-1].clamp(min=0), batch[:, 1:]  # (B, T)
        positions = None if eos_id is None else document_positions(inputs, eos_id)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            logits = model(inputs, positions)
        nll += float(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                     ignore_index=-100, reduction="sum"))
        valid = targets != -100
        count += int(valid.sum())
        n_bytes += int(byte_lengths.to(device)[targets[valid]].sum())
    model.train(was_training)
    return {"cross_entropy": nll / count, "bits_per_byte": nll / (math.log(2) * max(n_bytes, 1)),
            "tokens": count, "bytes": n_bytes}


@torch.no_grad()
def bits_per_byte(model: FANformer, tokenizer: Tokenizer, text: str, seq_len: int | None = None,
                  batch_size: int = 8, max_tokens: int | None = None) -> dict[str, float]:
    """Cross-entropy (nats/token) and bits per byte of `model` on `text`.

    The text is tokenized once and cut into non-overlapping windows of `seq_len` tokens
    (default: the model's context); every token but the first is predicted once. With
    `max_tokens` only a prefix is scored, and the byte count is that of the prefix.
    """
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise ValueError("the evaluation text is too short: it needs at least two tokens")
    return evaluate_tokens(model, np.asarray(ids, np.int64), token_byte_lengths(tokenizer),
                           seq_len or model.config.max_seq_len, batch_size, max_tokens)
