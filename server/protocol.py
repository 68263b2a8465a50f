"""The OpenAI wire format: pydantic request models, response models and small formatters.

Requests validate themselves (ranges, shapes, unsupported values -> a ValueError or pydantic
error that the API turns into a 400) and convert themselves into the engine's
`SamplingParams` with `to_sampling_params()`, as vLLM's protocol does. Unknown fields are
accepted and logged at warning level, never silently dropped without a trace. Responses
follow `openai/openai-openapi` (`CreateCompletionResponse`, `CreateChatCompletionResponse`,
`Model`, `ErrorResponse`). This module knows nothing about HTTP routing, the engine's
internals or the model; server/api.py is its only caller.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.sampling import SamplingParams

logger = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
MAX_PROMPTS = 64  # prompts in one /v1/completions request (each one fans out into n requests)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    """Accepts unknown fields (clients send extras freely) and logs their names once each."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_unknown_fields(self):
        if self.model_extra:
            logger.warning("%s: ignoring unknown fields %s", type(self).__name__,
                           sorted(self.model_extra))
        return self


# ---------------------------------------------------------------- errors
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`: all four keys, always."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------- requests
class StreamOptions(OpenAIModel):
    include_usage: bool = False


class SamplingFields(OpenAIModel):
    """Fields shared by both endpoints: OpenAI's, then the vLLM extras users rely on."""

    model: str | None = Field(None, description="a model id from /v1/models (default: the one)")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=-2**63, lt=2**63)  # int64, as OpenAI defines it
    user: str | None = None
    # vLLM-compatible extras (the openai client sends them via extra_body)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="keep only the prompt's last k tokens (-1: the last "
                                 "max_model_len); as vLLM")

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _check_truncate(cls, k):
        if k == 0:
            raise ValueError("must be -1 or at least 1, got 0")
        return k

    def truncate(self, ids: list[int], max_model_len: int) -> list[int]:
        """The prompt's token ids after `truncate_prompt_tokens` (the last k are kept)."""
        k = self.truncate_prompt_tokens
        if k is None:
            return ids
        if k > max_model_len:
            raise ValueError(f"truncate_prompt_tokens ({k}) is greater than max_model_len "
                             f"({max_model_len}); choose a smaller value")
        return ids[-(max_model_len if k == -1 else k):]

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop):
        if isinstance(stop, list):
            if len(stop) > MAX_STOP_SEQUENCES:
                raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stop)}")
            if any(s == "" for s in stop):
                raise ValueError("stop sequences must not be empty")
        elif stop == "":
            return None
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias):
        for key, value in (bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value}")
        return bias

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and \
            self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int, logprobs: int | None,
                         prompt_logprobs: int | None = None,
                         stop_token_ids: list[int] = ()) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias={int(k): float(v) for k, v in self.logit_bias.items()}
            if self.logit_bias else None,
            seed=self.seed,
            stop=stop,
            stop_token_ids=[*(self.stop_token_ids or []), *stop_token_ids],
            ignore_eos=self.ignore_eos,
            n=self.n,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )


Prompt = str | list[int]


class CompletionRequest(SamplingFields):
    """`POST /v1/completions` (OpenAI `CreateCompletionRequest` + vLLM extras)."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a string, a list of strings, token ids or a list of token-id lists")
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt_shape(cls, prompt):
        def is_ids(x):
            return isinstance(x, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in x)
        ok = isinstance(prompt, str) or is_ids(prompt) or (
            isinstance(prompt, list) and (all(isinstance(p, str) for p in prompt)
                                          or all(is_ids(p) for p in prompt)))
        if not ok:
            raise ValueError("prompt must be a string, a list of strings, a list of token ids "
                             "or a list of token-id lists")
        if prompt == [] or prompt == "" or (isinstance(prompt, list) and any(
                p == [] or p == "" for p in prompt)):
            raise ValueError("prompt must not be empty")
        if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) \
                and len(prompt) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}")
        return prompt

    @model_validator(mode="after")
    def _check_unsupported(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (it may only equal n)")
        return self

    def prompts(self) -> list[Prompt]:
        """The prompts as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.echo and self.logprobs is not None

    def to_sampling_params(self) -> SamplingParams:
        return self._sampling_params(
            max_tokens=16 if self.max_tokens is None else self.max_tokens,
            logprobs=self.logprobs,
            prompt_logprobs=self.logprobs if self.wants_prompt_logprobs else None)


class TextPart(OpenAIModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _only_text(cls, content):
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise ValueError("only text content parts are supported")
            return "".join(p.text for p in content)
        return content


class ResponseFormat(OpenAIModel):
    type: str


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions` (OpenAI `CreateChatCompletionRequest` + vLLM extras)."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias of "
                                                           "max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check_unsupported(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.tools:
            raise ValueError("tools are not supported by this model")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported by this model")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format must be {\"type\": \"text\"}; "
                             "json modes are not supported")
        return self

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content or ""} for m in self.messages]

    def to_sampling_params(self, default_max_tokens: int,
                           stop_token_ids: list[int] = ()) -> SamplingParams:
        """`default_max_tokens` (what is left of the context) applies when neither limit is set;
        `stop_token_ids` adds the chat template's end-of-turn token."""
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens=max_tokens, logprobs=logprobs,
                                     stop_token_ids=list(stop_token_ids))


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs object; one entry per token, prompt tokens first with echo."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fanformer"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# ---------------------------------------------------------------- token text
def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet (printable bytes map to themselves, the other
    68 bytes to code points from 256 up), so a token's exact bytes can be recovered."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenText:
    """Token id -> (text, bytes) for logprobs, cached. A token may hold part of a UTF-8
    character; its text then carries U+FFFD and its bytes stay exact (why `bytes` exists)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._decoder = _byte_decoder()
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self.tokenizer.id_to_token(token_id) or ""
            if token_id in self.tokenizer.special_ids or any(
                    ch not in self._decoder for ch in piece):
                raw = piece.encode()
            else:
                raw = bytes(self._decoder[ch] for ch in piece)
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit

    def text(self, token_id: int) -> str:
        return self(token_id)[0]
