"""Sampling parameters (checked when built) and the batched sampler the engine calls.

`SamplingParams` is what one engine request asks for; building one with a value out of
range raises ValueError naming the field and its valid range, and `validate(vocab_size)`
adds the one check that needs the model (token ids). `sample` turns one step's logits (one
row per request that samples this step) into token ids in one batched pass: per-row
temperature, top-k, top-p, min-p, penalties and logit bias as tensors, top-p without a full
sort, and a single host sync. Each sampled row draws one uniform from its request's own
`torch.Generator`, so a seeded request gives the same tokens whatever else is in the batch,
and the same as the reference loop (`fanformer.generate.sample_next`), which the tests use
as the oracle. Order: logit bias, penalties, min-tokens masking, temperature, top-k, top-p,
min-p, then the draw (temperature 0 = argmax). Reported logprobs are those of the model's
raw distribution. This module knows nothing about caches, scheduling, tokenizers or HTTP;
server/engine.py calls it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fanformer.generate import GREEDY_BELOW

if TYPE_CHECKING:
    from server.request import Request

MAX_LOGPROBS = 20
MAX_N = 16


@dataclass
class SamplingParams:
    """What one request asks of the sampler and the stop logic (OpenAI/vLLM semantics)."""

    max_tokens: int = 16  # >= 0; 0 only together with prompt_logprobs (echo scoring)
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0  # (0, 1]
    min_p: float = 0.0  # [0, 1]
    repetition_penalty: float = 1.0  # > 0; divide positive logits, multiply negative ones
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100]
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1  # 1..16; the HTTP layer fans n out into n engine requests
    logprobs: int | None = None  # top-N alternatives (0..20) per generated token
    prompt_logprobs: int | None = None  # same for prompt tokens; the first has None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        """Raise ValueError naming the first bad field and its valid range: a SamplingParams
        that exists is valid, except for token ids, which only the engine can check."""
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(isinstance(self.max_tokens, int) and self.max_tokens >= 0,
              f"max_tokens must be >= 0, got {self.max_tokens}")
        check(self.max_tokens > 0 or self.prompt_logprobs is not None,
              "max_tokens must be >= 1 unless prompt_logprobs is set, got 0")
        check(0 <= self.min_tokens <= max(self.max_tokens, 0),
              f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(self.top_k == -1 or self.top_k >= 0,
              f"top_k must be -1, 0 (off) or >= 1, got {self.top_k}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        check(self.repetition_penalty > 0,
              f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(-2 <= self.presence_penalty <= 2,
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2 <= self.frequency_penalty <= 2,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        for token, bias in (self.logit_bias or {}).items():
            check(isinstance(token, int) and token >= 0,
                  f"logit_bias keys must be token ids >= 0, got {token}")
            check(-100 <= bias <= 100, f"logit_bias values must be in [-100, 100], got {bias}")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
              f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids}")
        check(all(isinstance(s, str) and s for s in self.stop),
              "stop strings must be non-empty strings")
        check(1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}], got {self.n}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or 0 <= value <= MAX_LOGPROBS,
                  f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
        check(self.seed is None or isinstance(self.seed, int),
              f"seed must be an integer, got {self.seed!r}")

    def validate(self, vocab_size: int) -> None:
        """The one check construction cannot make: token ids inside the model's vocabulary."""
        for token in self.logit_bias or {}:
            if token >= vocab_size:
                raise ValueError(f"logit_bias keys must be token ids in [0, {vocab_size}), "
                                 f"got {token}")
        for token in self.stop_token_ids:
            if token >= vocab_size:
                raise ValueError(f"stop_token_ids must be token ids in [0, {vocab_size}), "
                                 f"got {token}")

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW (1e-5, as vLLM) are greedy, in the reference
        sampler too."""
        return self.temperature < GREEDY_BELOW

    @property
    def needs_history(self) -> bool:
        """Whether the logits depend on the tokens generated so far (penalties)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that edits the logits: the vectorized argmax fast path."""
        return self.greedy and not self.needs_history and not self.logit_bias



_FP32_MAX = torch.finfo(torch.float32).max
_NEG_INF = float("-inf")
# top-p without a full sort: the kept weights are bucketed by log-probability into this many
# buckets per row, and only the bucket that holds the nucleus boundary is ordered exactly
TOP_P_BUCKETS = 2048
TOP_P_SPAN = 40.0  # nats; exp(-40) = 4e-18


def _row_uniform(request: Request) -> torch.Tensor:
    """The request's one uniform for this token, from its own generator: (1,)."""
    generator = request.generator
    return torch.rand(1, generator=generator, device=generator.device)


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int | Exception]:
    """logits (B, vocab), one row per request -> a token id per row, or the exception that
    row raised (the engine then finishes that request alone with an error).

    One batched pass over the rows in fp32, one host sync at the end. Each sampled row takes
    exactly one uniform from its request's generator, so a seeded request draws the same
    tokens alone, in any batch, and in the reference loop (`fanformer.generate.sample_next`).
    """
    if all(r.params.plain_greedy and not (r.below_min_tokens and r.stop_ids)
           for r in requests):  # the common greedy batch: one argmax (fp32 is faster on CPU)
        return torch.argmax(logits.float(), dim=-1).tolist()
    results: list[int | Exception | None] = [None] * len(requests)
    rows, uniforms = [], []
    for i, request in enumerate(requests):  # the per-row part: a failure fails its row alone
        try:
            if not request.params.greedy:
                uniforms.append(_row_uniform(request))
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
    x = logits.float()
    if x is logits:
        x = x.clone()  # (B, V) fp32, edited in place below
    _edit_logits(x, requests)
    device = x.device
    tokens = torch.empty(len(requests), dtype=torch.long, device=device)
    greedy = [i for i, r in enumerate(requests) if r.params.greedy]
    if greedy:
        g = torch.tensor(greedy, device=device)
        tokens[g] = torch.argmax(x[g], dim=-1)
    valid = torch.ones(len(requests), dtype=torch.bool, device=device)
    sampled = [i for i, r in enumerate(requests) if not r.params.greedy]
    if sampled:
        s = torch.tensor(sampled, device=device)
        tokens[s], valid[s] = _draw(x[s], [requests[i].params for i in sampled],
                                    torch.cat(uniforms))
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
        column = lambda values: torch.tensor(values, device=device)[:, None]  # (P, 1)
        rep = column([r.params.repetition_penalty for r in rs])
        seen = torch.stack([r.seen_mask(vocab, device) for r in rs])
        # a penalty that is 0 in fp32 (5e-324) divides by zero: keep the boosted logits
        # finite, or the softmax turns them into NaN
        repeated = torch.where(sub > 0, sub / rep, sub * rep).clamp(max=_FP32_MAX)
        sub = torch.where(seen, repeated, sub)
        counts = torch.stack([r.output_counts(vocab, device) for r in rs])
        sub = (sub - column([r.params.frequency_penalty for r in rs]) * counts
               - column([r.params.presence_penalty for r in rs]) * (counts > 0))
        x[index] = sub
    banned = [(i, t) for i, r in enumerate(requests) if r.below_min_tokens
              for t in r.stop_ids]
    if banned:
        rows, ids = zip(*banned)
        x[torch.tensor(rows, device=device), torch.tensor(ids, device=device)] = _NEG_INF


def _draw(x: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k, top-p, min-p, then the inverse-CDF draw in token id order with
    each row's uniform: x (S, V) fp32, uniforms (S,) -> token ids (S,) and whether each row
    had finite weights to draw from (NaN logits would otherwise pick an id past the end)."""
    vocab, device = x.shape[1], x.device
    column = lambda values: torch.tensor(values, device=device, dtype=torch.float32)[:, None]
    x = x / column([p.temperature for p in params])
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):
        values = torch.topk(x, max(top_k), dim=-1).values  # (S, k_max), best first
        kth = values.gather(1, torch.tensor([max(k, 1) - 1 for k in top_k], device=device)[:, None])
        kth = torch.where(column(top_k) > 0, kth, _NEG_INF)
        x = x.masked_fill(x < kth, _NEG_INF)
    top = x.amax(-1, keepdim=True)  # (S, 1): every filter keeps the top token
    weights = torch.exp(x - top)  # (S, V), dropped tokens weigh 0
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1]
    if nucleus:
        index = torch.tensor(nucleus, device=device)
        keep = _top_p_keep(x[index], weights[index], top[index],
                           column([params[i].top_p for i in nucleus]))
        weights[index] = weights[index].masked_fill_(~keep, 0.0)
    if any(p.min_p > 0 for p in params):  # p_i < min_p * p_max <=> x_i < x_max + log(min_p)
        floor = column([math.log(p.min_p) if p.min_p > 0 else _NEG_INF for p in params])
        weights.masked_fill_(x < top + floor, 0.0)
    cdf = weights.cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms[:, None] * total,
                           torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cdf, target, right=True)[:, 0]
    valid = torch.isfinite(total[:, 0]) & (total[:, 0] > 0)
    return tokens.clamp_(max=x.shape[1] - 1), valid


def _top_p_keep(x: torch.Tensor, weights: torch.Tensor, top: torch.Tensor,
                top_p: torch.Tensor) -> torch.Tensor:
    """x (S, V) fp32 logits (-inf = dropped), their weights exp(x - top), the row maxima
    (S, 1) and top_p (S, 1) -> (S, V) bool: the nucleus, the tokens whose likelier tokens
    weigh less than top_p of the total together (the top one always stays).

    A full sort of a 32k vocabulary costs ~3 ms a row on CPU. Instead each row's weights are
    summed into TOP_P_BUCKETS buckets of log-probability; the buckets before the one where
    the running sum crosses top_p are kept, those after it dropped, and only the tokens of
    that boundary bucket (a few dozen) are ordered, with a top-k.
    """
    target = top_p * weights.sum(-1, keepdim=True)  # (S, 1)
    gap = top - x  # (S, V) >= 0, inf for dropped tokens
    # tokens more than TOP_P_SPAN below the top weigh nothing in fp32 sums: they share the
    # last bucket, so the buckets cover what matters (and a -inf does not stretch them)
    span = gap.clamp(max=TOP_P_SPAN).amax(-1, keepdim=True).clamp_(min=1e-30)  # (S, 1)
    bucket = (gap * ((TOP_P_BUCKETS - 1) / span)).clamp_(max=TOP_P_BUCKETS - 1).long()
    mass = torch.zeros(x.shape[0], TOP_P_BUCKETS, device=x.device)
    running = mass.scatter_add_(1, bucket, weights).cumsum(-1)  # (S, buckets)
    edge = (running < target).sum(-1, keepdim=True).clamp_(max=TOP_P_BUCKETS - 1)  # (S, 1)
    before = torch.where(edge > 0, running.gather(1, (edge - 1).clamp(min=0)), 0.0)
    on_edge = bucket == edge  # (S, V)
    n = int(on_edge.sum(-1).max())
    candidates = torch.topk(x.masked_fill(~on_edge, _NEG_INF), n, dim=-1).values  # (S, n)
    w = torch.exp(candidates - top)
    kept = (before + w.cumsum(-1) - w < target).sum(-1, keepdim=True)  # a prefix of them
    threshold = torch.where(kept > 0, candidates.gather(1, (kept - 1).clamp(min=0)),
                            float("inf"))
    return (bucket < edge) | (on_edge & (x >= threshold)) | (x >= top)


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
