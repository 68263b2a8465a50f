"""The batched sampler the engine calls (`SamplingParams` lives in server/sampling_params.py).

`sample` turns one step's logits (one
row per request that samples this step) into token ids in one batched pass: per-row
temperature, top-k, top-p, min-p, penalties and logit bias as tensors, top-p by rejection
(no sort), and a single host sync. Each sampled row takes two uniforms from its request's
own `torch.Generator`, so a seeded request gives the same tokens whatever else is in the batch,
and the same as the reference loop (`fanformer.generate.sample_next`), which the tests use
as the oracle. Order: logit bias, penalties, min-tokens masking, temperature, top-k, top-p,
min-p, then the draw (temperature 0 = argmax). Reported logprobs are those of the model's
raw distribution. This module knows nothing about caches, scheduling, tokenizers or HTTP;
server/engine.py calls it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from quant import native_cpu
from server.sampling_params import SamplingParams

if TYPE_CHECKING:
    from server.request import Request

_FP32_MAX = torch.finfo(torch.float32).max
_NEG_INF = float("-inf")
# top-p without a full sort: the kept weights are bucketed by log-probability into this many
# buckets per row, and only the bucket that holds the nucleus boundary is ordered exactly
TOP_P_BUCKETS = 2048
TOP_P_SPAN = 40.0  # nats; exp(-40) = 4e-18
# batches of up to this many logits take the native first draw on one thread: waking
# torch's second OpenMP thread (PASSIVE) costs more than it saves there
NATIVE_SINGLE_THREAD_MAX = 1 << 17


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    """Per-row parameters as an fp32 (R, 1) column that broadcasts over the vocabulary."""
    return torch.tensor(values, device=device, dtype=torch.float32)[:, None]


def _row_uniforms(request: Request) -> torch.Tensor:
    """The request's two uniforms for this token, from its own generator: (2,)."""
    generator = request.generator
    return torch.rand(2, generator=generator, device=generator.device)


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int | Exception]:
    """logits (B, vocab), one row per request -> a token id per row, or the exception that
    row raised (the engine then finishes that request alone with an error).

    One batched pass over the rows in fp32, one host sync at the end. Each sampled row takes
    exactly two uniforms from its request's generator, so a seeded request draws the same
    tokens alone, in any batch, and in the reference loop (`fanformer.generate.sample_next`).
    """
    if all(r.params.greedy and not r.edits_logits
           for r in requests):  # the common greedy batch: one argmax (fp32 is faster on CPU)
        # torch.max's indices (the first maximum, as argmax) cost half of argmax on CPU
        return torch.max(logits.float(), dim=-1).indices.tolist()
    results: list[int | Exception | None] = [None] * len(requests)
    rows, uniforms = [], []
    for i, request in enumerate(requests):  # the per-row part: a failure fails its row alone
        try:
            if not request.params.greedy:
                uniforms.append(_row_uniforms(request))
            rows.append(i)
        except Exception as e:  # noqa: BLE001 - one bad request must not kill the batch
            results[i] = e
    if rows:
        try:
            tokens = _sample_rows(logits[rows] if len(rows) < len(requests) else logits,
                                  [requests[i] for i in rows], uniforms)
        except Exception as e:  # noqa: BLE001 - fails these rows; the engine goes on
            tokens = [e] * len(rows)
        for i, token in zip(rows, tokens):
            results[i] = token
    return results


def _sample_rows(logits: torch.Tensor, requests: list[Request],
                 uniforms: list[torch.Tensor]) -> list[int]:
    if any(r.edits_logits for r in requests):
        x = logits.float()
        if x is logits:
            x = x.clone()  # (B, V) fp32, edited in place below
        _edit_logits(x, requests)
    else:  # nothing to edit: `_draw`'s temperature division makes the fp32 copy
        x = logits
    device = x.device
    greedy = [i for i, r in enumerate(requests) if r.params.greedy]
    sampled = [i for i, r in enumerate(requests) if not r.params.greedy]
    if not greedy:  # the common sampled batch: no gather, no scatter
        tokens, valid = _draw(x, [r.params for r in requests], torch.stack(uniforms))
    else:
        tokens = torch.max(x, dim=-1).indices  # (B,), the sampled rows are overwritten
        valid = torch.ones(len(requests), dtype=torch.bool, device=device)
        if sampled:
            s = torch.tensor(sampled, device=device)
            tokens[s], valid[s] = _draw(x[s], [requests[i].params for i in sampled],
                                        torch.stack(uniforms))
    return [t if ok else ValueError("sampling failed: the logits are not finite")
            for t, ok in zip(tokens.tolist(), valid.tolist())]


def _edit_logits(x: torch.Tensor, requests: list[Request]) -> None:
    """Logit bias, penalties and min-tokens masking, in place on x (B, V) fp32."""
    vocab, device = x.shape[1], x.device
    bias = [(i, t, b) for i, r in enumerate(requests)
            for t, b in (r.params.logit_bias or {}).items()]
    if bias:
        rows, ids, values = zip(*bias)
        x.index_put_((torch.tensor(rows, device=device), torch.tensor(ids, device=device)),
                     torch.tensor(values, device=device), accumulate=True)
    penalized = [i for i, r in enumerate(requests) if r.params.needs_history]
    if penalized:
        index = torch.tensor(penalized, device=device)
        rs = [requests[i] for i in penalized]
        sub = x[index]  # (P, V)
        if any(r.params.repetition_penalty != 1.0 for r in rs):
            rep = _column([r.params.repetition_penalty for r in rs], device)
            seen = torch.stack([r.seen_mask(vocab, device) for r in rs])
            # a penalty that is 0 in fp32 (5e-324) divides by zero: keep the boosted logits
            # finite, or the softmax turns them into NaN
            repeated = torch.where(sub > 0, sub / rep, sub * rep).clamp(max=_FP32_MAX)
            sub = torch.where(seen, repeated, sub)
        if any(r.params.presence_penalty or r.params.frequency_penalty for r in rs):
            counts = torch.stack([r.output_counts(vocab, device) for r in rs])
            sub = (sub - _column([r.params.frequency_penalty for r in rs], device) * counts
                   - _column([r.params.presence_penalty for r in rs], device) * (counts > 0))
        x[index] = sub
    banned = [(i, t) for i, r in enumerate(requests) if r.bans_stop_ids
              for t in r.stop_ids]
    if banned:
        rows, ids = zip(*banned)
        x[torch.tensor(rows, device=device), torch.tensor(ids, device=device)] = _NEG_INF


def _draw(x: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k, min-p, then top-p by rejection, as `sample_next` does one row at
    a time: x (S, V) fp32 or bf16, uniforms (S, 2) -> token ids (S,) and whether each row
    had finite weights to draw from (NaN logits would otherwise pick an id past the end).

    Every row draws from its top-k/min-p distribution with its first uniform; only the rows
    whose token falls outside their nucleus (about 1 - top_p of them) compute the nucleus
    and draw again from it with their second uniform. So a typical step makes a handful of
    passes over the logits instead of ordering any of them. On CPU with the native kernels
    the first draw is one C call for the batch (quant/native_sample.c); the few redrawn
    rows take the torch path below either way.
    """
    first = _native_first_draw(x, params, uniforms[:, 0])
    if first is None:
        first = _first_draw(x, params, uniforms[:, 0])
    tokens, valid, missed = first
    if bool(missed.any()):
        redo = missed.nonzero()[:, 0]
        tokens[redo] = _nucleus_draw(x[redo], [params[i] for i in redo.tolist()],
                                     uniforms[redo, 1])
    return tokens, valid


def _scaled(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """x (S, V) -> a new fp32 (S, V): over each row's temperature, its top-k applied (-inf
    below the k-th logit; bf16 logits are widened exactly first)."""
    vocab, device = x.shape[1], x.device
    x = torch.div(x, _column([p.temperature for p in params], device))
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):
        values = torch.topk(x, max(top_k), dim=-1).values  # (S, k_max), best first
        kth = values.gather(1, torch.tensor([max(k, 1) - 1 for k in top_k], device=device)[:, None])
        kth = torch.where(_column(top_k, device) > 0, kth, _NEG_INF)
        x.masked_fill_(x < kth, _NEG_INF)
    return x


def _filtered(x: torch.Tensor, params: list[SamplingParams]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (S, V) -> the scaled logits (S, V), their maxima (S, 1), the top-k distribution's
    weights exp(x - max) (S, V; the top weighs 1) and those min-p keeps (S, V)."""
    x = _scaled(x, params)
    top = x.amax(-1, keepdim=True)  # (S, 1): every filter keeps the top token
    weights = torch.sub(x, top).exp_()
    kept = weights
    if any(p.min_p > 0 for p in params):  # p_i < min_p * p_max <=> x_i < x_max + log(min_p)
        kept = weights.masked_fill(x < top + _min_p_floor(params, x.device)[:, None], 0.0)
    return x, top, weights, kept


def _min_p_floor(params: list[SamplingParams], device: torch.device) -> torch.Tensor:
    """(S,) fp32: log(min_p) per row, -inf where min-p is off."""
    return torch.tensor([math.log(p.min_p) if p.min_p > 0 else _NEG_INF for p in params],
                        device=device)


def _first_draw(x: torch.Tensor, params: list[SamplingParams], uniform: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first draw in torch: x (S, V), uniform (S,) -> tokens (S,), valid (S,) and
    whether each token lies outside its row's top-p nucleus (S,)."""
    x, _, weights, kept = _filtered(x, params)
    tokens, valid = _inverse_cdf(kept, uniform)
    top_p = _column([p.top_p for p in params], x.device)  # (S, 1)
    w = weights.gather(1, tokens[:, None])  # (S, 1): the drawn token's weight
    above = _sum_above(weights, w)  # (S, 1): the weight of the tokens likelier than it
    missed = (top_p < 1) & (w < 1) & (above >= top_p * weights.sum(-1, keepdim=True))
    return tokens, valid, missed[:, 0]


def _native_first_draw(x: torch.Tensor, params: list[SamplingParams], uniform: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The same first draw in one C call (quant/native_sample.c), or None where the native
    kernels do not run (not CPU, not built here, or turned off)."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32) or \
            native_cpu.library() is None:
        return None
    rows, vocab = x.shape
    temperature = torch.tensor([p.temperature for p in params])
    if any(0 < p.top_k < vocab for p in params):  # top-k in torch, then x / 1 = x in C
        x, temperature = _scaled(x, params), torch.ones(rows)
    threads = 1 if rows * vocab <= NATIVE_SINGLE_THREAD_MAX else torch.get_num_threads()
    tokens, status = native_cpu.sample_rows(
        x, temperature, _min_p_floor(params, x.device), torch.tensor([p.top_p for p in params]),
        uniform.contiguous(), threads)
    return tokens, status != 0, status == 2


def _nucleus_draw(x: torch.Tensor, params: list[SamplingParams], uniform: torch.Tensor
                  ) -> torch.Tensor:
    """The second draw of the rows that missed their nucleus: x (P, V) as `_draw` got it,
    uniform (P,) -> tokens (P,) from each row's top-p nucleus (after top-k and min-p)."""
    x, top, weights, kept = _filtered(x, params)
    top_p = _column([p.top_p for p in params], x.device)
    threshold = _top_p_threshold(x, weights, top, top_p)
    return _inverse_cdf(kept.masked_fill(x < threshold, 0.0), uniform)[0]


def _sum_above(weights: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """weights (S, V) >= 0 and finite, w (S, 1) -> (S, 1): the sum of the weights > w.

    The same values as `torch.where(weights > w, weights, 0.0).sum(-1)` (and so the same
    sum, bit for bit), but through arithmetic kernels: on this CPU `torch.where` over a
    64 x 32k batch took ~10x an elementwise subtraction. (A NaN weight gives NaN here and 0
    there; such rows are rejected anyway, `_inverse_cdf` marks them invalid.)
    """
    above = torch.sub(weights, w).gt_(0.0)  # 1.0 where weights > w, else 0.0
    return above.mul_(weights).sum(-1, keepdim=True)


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """weights (S, V), uniforms (S,) -> the tokens whose cumulative weight (token id order)
    first exceeds u x the row's total (S,), and whether the total is finite and > 0."""
    cdf = weights.cumsum(-1)
    total = cdf[:, -1:]
    # u * total can round up to total; the last kept token must stay reachable
    target = torch.minimum(uniforms[:, None] * total,
                           torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cdf, target, right=True)[:, 0]
    valid = torch.isfinite(total[:, 0]) & (total[:, 0] > 0)
    return tokens.clamp_(max=weights.shape[1] - 1), valid


def _top_p_threshold(x: torch.Tensor, weights: torch.Tensor, top: torch.Tensor,
                     top_p: torch.Tensor) -> torch.Tensor:
    """x (S, V) fp32 logits (-inf = dropped), their weights exp(x - top), the row maxima
    (S, 1) and top_p (S, 1) -> (S, 1): the smallest logit of the nucleus, the tokens whose
    likelier tokens weigh less than top_p of the total together (the top one always).

    A full sort of a 32k vocabulary costs ~3 ms a row on CPU. Instead each row's weights are
    summed into TOP_P_BUCKETS buckets of log-probability; the buckets before the one where
    the running sum crosses top_p are kept, those after it dropped, and only the tokens of
    that boundary bucket (a few dozen) are ordered, with a top-k.
    """
    # buckets are linear in the gap below the top logit, over the row's own range; tokens
    # more than TOP_P_SPAN below the top weigh nothing in fp32 sums and share the last
    # bucket with dropped (-inf) tokens, which therefore never stretch the range
    span = (top - x.amin(-1, keepdim=True)).clamp_(min=1e-30, max=TOP_P_SPAN)  # (S, 1)
    scale = (TOP_P_BUCKETS - 1) / span
    # (top - x) * scale in one pass as top*scale - x*scale: monotone in x, 0 at the top
    bucket = torch.addcmul(top * scale, x, scale, value=-1.0)
    bucket = bucket.clamp_(max=TOP_P_BUCKETS - 1).long()  # (S, V)
    mass = torch.zeros(x.shape[0], TOP_P_BUCKETS, device=x.device)
    running = mass.scatter_add_(1, bucket, weights).cumsum_(-1)  # (S, buckets)
    target = top_p * running[:, -1:]  # (S, 1): top_p of the total weight
    edge = (running < target).sum(-1, keepdim=True).clamp_(max=TOP_P_BUCKETS - 1)  # (S, 1)
    before = torch.where(edge > 0, running.gather(1, (edge - 1).clamp(min=0)), 0.0)
    on_edge = bucket == edge  # (S, V)
    n = int(on_edge.sum(-1).max())
    candidates = torch.topk(torch.where(on_edge, x, _NEG_INF), n, dim=-1).values  # (S, n)
    w = torch.exp(candidates - top)
    kept = (before + w.cumsum(-1) - w < target).sum(-1, keepdim=True)  # a prefix of them
    # buckets fall as logits rise, so every token of an earlier bucket has a larger logit
    # than any of the boundary bucket's: the nucleus is x >= the smallest logit kept
    above_edge = torch.nextafter(candidates[:, :1], torch.full_like(top, float("inf")))
    threshold = torch.where(kept > 0, candidates.gather(1, (kept - 1).clamp(min=0)),
                            above_edge)
    return torch.minimum(threshold, top)  # (S, 1); the top token always stays


def top_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
                 ) -> list[tuple[float, list[tuple[int, float]]]]:
    """logprobs (R, vocab), token_ids (R,) -> per row (logprob of the token, top-k alts)."""
    chosen = logprobs.gather(1, token_ids[:, None])[:, 0].tolist()
    if k > 0:
        values, ids = logprobs.topk(k, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return list(zip(chosen, tops))
