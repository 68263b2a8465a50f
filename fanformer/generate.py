"""The reference generation loop: one request at a time, plain and obviously right.

It is the oracle the serving engine is tested against (same tokens at temperature 0), and
the `fanformer-generate` command until the engine takes it over. Sampling applies, in
order: min-length EOS masking, temperature, top-k, top-p, then a draw from the caller's
`torch.Generator` (a temperature below GREEDY_BELOW, 0 included, is greedy argmax). Lengths
count generated tokens only; the original project counted the prompt in `min_length`, which
we do not.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from fanformer.model import ContiguousKVCache, FANformer

# Temperatures below this are greedy (as in vLLM): dividing logits by 1e-80 overflows to inf
# and the draw would fail on NaN probabilities. The engine's SamplingParams.greedy uses it too.
GREEDY_BELOW = 1e-5


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, generator: torch.Generator | None = None,
                min_p: float = 0.0) -> int:
    """Pick one token id from `logits` (vocab,): the oracle the serving engine's batched
    sampler is tested against, token for token under the same generator.

    Filters, in order: temperature, top-k, top-p, min-p (drops tokens whose probability is
    below min_p x the top token's). Each token takes two uniforms from `generator`. The
    first draws from the top-k and min-p filtered distribution by inverting its cumulative
    weights in token id order (exact, and no sort). With top-p, a drawn token outside the
    nucleus (the tokens likelier than it weigh top_p or more together) is replaced by a
    draw from the nucleus with the second uniform: P(t) = q(t) + (1 - Q) q(t) / Q = q(t) / Q
    for t in the nucleus (mass Q), exactly top-p sampling, while a batched sampler needs
    the nucleus itself only for the few rows that miss it.
    """
    if temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top = logits.max()
    weights = torch.exp(logits - top)  # the top-k distribution top-p reads; the top weighs 1
    kept = weights
    if min_p > 0:  # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p)
        kept = weights.masked_fill(logits < top + math.log(min_p), 0.0)
    u = torch.rand(2, generator=generator, device=logits.device)
    token = _inverse_cdf(kept, u[0])
    if top_p < 1.0:
        w = weights[token]
        above = torch.where(weights > w, weights, 0.0).sum()
        if w < 1 and above >= top_p * weights.sum():  # outside the nucleus
            token = _inverse_cdf(kept.masked_fill(~_nucleus(logits, top_p), 0.0), u[1])
    return token


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> int:
    """The token whose cumulative weight (token id order) first exceeds u x the total."""
    cdf = weights.cumsum(0)
    total = cdf[-1:]
    # u * total can round up to total; the last kept token must stay reachable
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return int(torch.searchsorted(cdf, target, right=True))


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(vocab,) bool: the tokens whose likelier tokens weigh less than top_p together (a
    full sort); the top one always, and every token tied with the last one kept (the
    nucleus must not depend on how the sort orders equal logits; bf16 logits have many)."""
    sorted_logits, _ = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(-1) - probs >= top_p
    drop[0] = False  # a top_p that rounds to 0 in float32 (5e-324) must not drop all
    return logits >= sorted_logits[int((~drop).sum()) - 1]


@torch.no_grad()
def generate(model: FANformer, prompt_ids: list[int], max_new_tokens: int,
             min_new_tokens: int = 0, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> list[int]:
    """Generated token ids (without the prompt), stopping at EOS (included) or the budget."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    max_len = model.config.max_seq_len
    if len(prompt_ids) + max_new_tokens > max_len:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"the model's context of {max_len} tokens")
    device = model.embed.weight.device
    tokens = list(prompt_ids)
    cache = ContiguousKVCache(model.config, 1, len(prompt_ids) + max_new_tokens,
                              dtype=model.embed.weight.dtype, device=device) if use_cache else None
    out: list[int] = []
    pending = tokens  # tokens the model has not seen yet (with a cache)
    for _ in range(max_new_tokens):
        if cache is not None:
            start = len(tokens) - len(pending)
            ids = torch.tensor([pending], device=device)
            positions = torch.arange(start, len(tokens), device=device)[None]
            logits = model(ids, positions, cache)[0, -1]
        else:
            logits = model(torch.tensor([tokens], device=device))[0, -1]
        if eos_id is not None and len(out) < min_new_tokens:
            logits[eos_id] = float("-inf")
        token = sample_next(logits, temperature, top_k, top_p, generator)
        out.append(token)
        tokens.append(token)
        pending = [token]
        if token == eos_id:
            break
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fanformer-generate", description="Generate text from a FANformer checkpoint.")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: demo model)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max_length", type=int, default=100, help="most tokens to generate")
    p.add_argument("--min_length", type=int, default=0,
                   help="fewest tokens to generate before end-of-text may end it")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=100, help="keep the k likeliest tokens; 0 = all")
    p.add_argument("--top_p", type=float, default=0.85, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    return p


def validate_sampling_args(args: argparse.Namespace) -> str | None:
    if args.max_length < 1:
        return f"--max_length must be >= 1, got {args.max_length}"
    if not 0 <= args.min_length <= args.max_length:
        return f"--min_length must be in [0, max_length={args.max_length}], got {args.min_length}"
    if args.temperature < 0:
        return f"--temperature must be >= 0, got {args.temperature}"
    if args.top_k < 0:
        return f"--top_k must be >= 0, got {args.top_k}"
    if not 0 < args.top_p <= 1:
        return f"--top_p must be in (0, 1], got {args.top_p}"
    return None


def main(argv: list[str] | None = None) -> int:
    from fanformer.checkpoint import DEMO_CHECKPOINT, CheckpointError, load_checkpoint

    args = build_parser().parse_args(argv)
    error = validate_sampling_args(args)
    if error:
        print(f"fanformer-generate: error: {error}", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load_checkpoint(args.checkpoint or DEMO_CHECKPOINT, device=args.device)
        generator = torch.Generator(args.device)
        generator.manual_seed(args.seed if args.seed is not None else torch.seed())
        prompt = tokenizer.encode(args.prompt)
        ids = generate(model, prompt, args.max_length, args.min_length, args.temperature,
                       args.top_k, args.top_p, tokenizer.eos_id, generator)
    except (CheckpointError, ValueError) as e:
        print(f"fanformer-generate: error: {e}", file=sys.stderr)
        return 1
    print(args.prompt + tokenizer.decode(ids, skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
