"""`SamplingParams`: what one engine request asks of the sampler and the stop logic.

Building one with a value out of range raises ValueError naming the field and its valid
range ("top_p must be in (0, 1], got 1.5"), so a SamplingParams that exists is valid;
`validate(vocab_size)` adds the one check that needs the model (token ids). The HTTP layer
builds them (server/protocol.py), the engine reads them; this module knows nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fanformer.generate import GREEDY_BELOW

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
    def edits_logits(self) -> bool:
        """Whether the sampler edits this row's logits before the filters (bias, penalties)."""
        return self.needs_history or bool(self.logit_bias)
