"""What the engine hands its callers: per-step request outputs, its stats and its errors.

Kept apart from server/engine.py so that the async front (server/async_engine.py), the HTTP
layer and the engine all import these from one place without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top-N alternatives (token id, logprob), best first


@dataclass
class RequestOutput:
    """One per step that produced something for a request; fields are deltas except totals."""

    request_id: str
    text: str  # new text since the previous output
    token_ids: list[int]  # new generated token ids since the previous output
    logprobs: list[TokenLogprob] | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprob | None] | None  # only in the first output
    num_generated_tokens: int
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    error: str | None = None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # share of the KV blocks running sequences hold, 0..1
    num_free_blocks: int  # held by no sequence (prefix-cached ones included)
    num_blocks: int
    num_steps: int
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int = 0  # of those, tokens found (cumulative)
    num_preemptions: int = 0  # cumulative


class EngineError(Exception):
    """Base of the errors the engine raises to its callers."""


class QueueFullError(EngineError):
    """Too many requests are waiting (HTTP 429)."""


class RequestTooLongError(EngineError):
    """prompt + max_tokens does not fit max_model_len (HTTP 400)."""


class EngineDeadError(EngineError):
    """The engine loop died; no request can be served (HTTP 503)."""
