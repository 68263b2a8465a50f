"""Sampling parameters (validated at the boundary) and the batched sampler the engine calls.

`SamplingParams` is what one engine request asks for; `validate` raises ValueError with a
message that names the valid range. `sample_batch` turns one step's logits (one row per
sequence that samples this step) into token ids, each row drawn from that request's own
`torch.Generator`, so a seeded request gives the same tokens whatever else is in the batch.
Order of processing, as the reference loop in fanformer/generate.py: logit bias and
penalties, min-tokens masking, temperature, top-k, top-p, min-p, then the draw
(temperature 0 = argmax). Reported logprobs are those of the model's raw distribution.
This module knows nothing about caches, scheduling, tokenizers or HTTP; server/engine.py
calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fanformer.generate import GREEDY_BELOW, sample_next

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

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the first bad field and its valid range."""
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
            check(isinstance(token, int) and 0 <= token < vocab_size,
                  f"logit_bias keys must be token ids in [0, {vocab_size}), got {token}")
            check(-100 <= bias <= 100, f"logit_bias values must be in [-100, 100], got {bias}")
        for token in self.stop_token_ids:
            check(isinstance(token, int) and 0 <= token < vocab_size,
                  f"stop_token_ids must be token ids in [0, {vocab_size}), got {token}")
        check(all(isinstance(s, str) and s for s in self.stop),
              "stop strings must be non-empty strings")
        check(1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}], got {self.n}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or 0 <= value <= MAX_LOGPROBS,
                  f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
        check(self.seed is None or isinstance(self.seed, int),
              f"seed must be an integer, got {self.seed!r}")

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


@dataclass
class SamplingState:
    """Per-request sampler state the engine keeps: the generator and the token history."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int]
    output_ids: list[int]
    banned_until_min: list[int]  # EOS (unless ignore_eos) and stop_token_ids

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
               eos_id: int | None, device: torch.device | str) -> SamplingState:
        generator = None
        if not params.greedy:
            generator = torch.Generator(device)
            if params.seed is not None:
                generator.manual_seed(params.seed)
            else:
                generator.seed()
        banned = list(params.stop_token_ids)
        if eos_id is not None and not params.ignore_eos:
            banned.append(eos_id)
        return cls(params, generator, prompt_ids, output_ids, banned)


_FP32_MAX = torch.finfo(torch.float32).max


def _edit_logits(row: torch.Tensor, state: SamplingState) -> torch.Tensor:
    """Bias, penalties and min-tokens masking on one fp32 row (vocab,)."""
    p = state.params
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=row.device)
        row = row.index_add(0, ids, torch.tensor(list(p.logit_bias.values()),
                                                 device=row.device, dtype=row.dtype))
    if p.needs_history:
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(state.prompt_ids) | set(state.output_ids)),
                                device=row.device, dtype=torch.long)
            vals = row[seen]
            row = row.clone()
            # a penalty that is 0 in fp32 (5e-324, found by schemathesis) divides by zero:
            # keep the boosted logits finite, or the softmax turns them into NaN
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                    vals * p.repetition_penalty).clamp(max=_FP32_MAX)
        if state.output_ids and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(state.output_ids, device=row.device),
                                    minlength=row.numel())[: row.numel()].to(row.dtype)
            row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
    if len(state.output_ids) < p.min_tokens and state.banned_until_min:
        row = row.clone()
        row[torch.tensor(state.banned_until_min, device=row.device)] = float("-inf")
    return row


def _draw(row: torch.Tensor, state: SamplingState) -> int:
    """Temperature, top-k, top-p, min-p, then one draw with the row's generator: the
    reference loop's `sample_next`, so engine and reference draw alike."""
    p = state.params
    return sample_next(row, p.temperature, p.top_k, p.top_p, state.generator, p.min_p)


def sample_batch(logits: torch.Tensor, states: list[SamplingState]
                 ) -> list[int | Exception]:
    """logits (B, vocab), one row per state -> a token id per row, or the exception that
    row raised (the engine then finishes that request alone with an error).

    All-greedy batches take one vectorized argmax (in fp32: the CPU's bf16 argmax is ten
    times slower than the cast plus an fp32 argmax); other rows are processed in fp32.
    """
    if all(s.params.plain_greedy and len(s.output_ids) >= s.params.min_tokens for s in states):
        return torch.argmax(logits.float(), dim=-1).tolist()  # one vectorized argmax
    results: list[int | Exception] = []
    for row, state in zip(logits.float(), states):
        try:
            results.append(_draw(_edit_logits(row, state), state))
        except Exception as e:  # noqa: BLE001 - one bad request must not kill the batch
            results.append(e)
    return results


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
