"""Text in, tokens out: reading text files and measuring bits per byte.

Bits per byte (total negative log-likelihood in nats / (ln 2 x UTF-8 bytes of the text))
compares models whose tokenizers differ, which per-token perplexity cannot. This module
knows nothing about optimizers or serving; `train.py` and `quant` call it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from fanformer.model import FANformer
from fanformer.tokenizer import Tokenizer

EVAL_TEXT = Path(__file__).resolve().parent / "assets" / "eval.txt"


@torch.no_grad()
def bits_per_byte(model: FANformer, tokenizer: Tokenizer, text: str, seq_len: int | None = None,
                  batch_size: int = 8, max_tokens: int | None = None) -> dict[str, float]:
    """Cross-entropy (nats/token) and bits per byte of `model` on `text`.

    The text is tokenized once and cut into non-overlapping windows of `seq_len` tokens
    (default: the model's context); every token but the first is predicted once. With
    `max_tokens` only a prefix is scored, and the byte count is that of the prefix.
    """
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    if len(ids) < 2:
        raise ValueError("the evaluation text is too short: it needs at least two tokens")
    seq_len = seq_len or model.config.max_seq_len
    device = model.embed.weight.device
    was_training = model.training
    model.eval()
    tokens = torch.tensor(ids, device=device)
    windows = [tokens[i: i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)]
    nll, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        group = windows[start: start + batch_size]
        width = max(len(w) for w in group)
        batch = torch.stack([F.pad(w, (0, width - len(w)), value=-100) for w in group])
        inputs, targets = batch[:, :-1].clamp(min=0), batch[:, 1:]
        logits = model(inputs).float()
        nll += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                     reduction="sum"))
        count += int((targets != -100).sum())
    model.train(was_training)
    n_bytes = len(tokenizer.decode(ids[1:]).encode("utf-8"))
    return {"cross_entropy": nll / count, "bits_per_byte": nll / (math.log(2) * n_bytes),
            "tokens": count, "bytes": n_bytes}
