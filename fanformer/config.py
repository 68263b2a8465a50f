"""Model configuration: one frozen dataclass and the presets it can be built from.

Every field is documented where it is declared; the same text is what `--help` prints.
Presets are looked up by exact name, and unknown names or keys fail with a message that
lists the valid ones (no silently dropped keys). This module knows nothing about
training, tokenizers or serving.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

VOCAB_MULTIPLE = 64  # the embedding's vocab dimension is padded to this (int4 kernels need it)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and switches of one FANformer (or dense baseline) model."""

    vocab_size: int = field(default=49152, metadata={"help": "tokenizer vocabulary size"})
    d_model: int = field(default=768, metadata={"help": "hidden width"})
    n_layers: int = field(default=12, metadata={"help": "number of blocks"})
    n_heads: int = field(default=12, metadata={"help": "query heads"})
    n_kv_heads: int = field(
        default=6, metadata={"help": "key/value heads (grouped-query attention)"}
    )
    d_ff: int = field(default=2048, metadata={"help": "SwiGLU hidden width"})
    max_seq_len: int = field(default=1024, metadata={"help": "context length in tokens"})
    fan_p: float = field(
        default=0.15,
        metadata={"help": "share of periodic (cos/sin) channels in the FAN layer; 0 = no FAN"},
    )
    cola_rank: int = field(
        default=192, metadata={"help": "CoLA low-rank bottleneck; 0 = dense linears"}
    )
    norm: str = field(
        default="hybrid",
        metadata={"help": "'hybrid' (HybridNorm*: QKV-norm, post-norm FFN) or 'pre' (pre-norm)"},
    )
    gated_residual: bool = field(
        default=True, metadata={"help": "per-channel sigmoid gates on both residual branches"}
    )
    dropout: float = field(default=0.1, metadata={"help": "dropout rate, training only"})
    norm_eps: float = field(default=1e-5, metadata={"help": "RMSNorm epsilon"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base"})

    def __post_init__(self) -> None:
        problems = []
        if self.d_model % self.n_heads:
            problems.append(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            problems.append(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.d_model // max(self.n_heads, 1) % 2:
            problems.append("head_dim (d_model / n_heads) must be even for RoPE")
        if not 0.0 <= self.fan_p < 0.5:
            problems.append(f"fan_p must be in [0, 0.5), got {self.fan_p}")
        if self.norm not in ("hybrid", "pre"):
            problems.append(f"norm must be 'hybrid' or 'pre', got {self.norm!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                     "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.cola_rank < 0:
            problems.append(f"cola_rank must be >= 0, got {self.cola_rank}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def fan_periodic_dim(self) -> int:
        """Width of the cos block (and of the sin block) of the FAN layer."""
        return int(self.d_model * self.fan_p)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(
                f"unknown ModelConfig keys {unknown}; valid keys: {', '.join(field_names())}"
            )
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


def _dense(**shape: Any) -> dict[str, Any]:
    """A plain pre-norm Llama-style baseline: no FAN, no CoLA, no gates."""
    return {**shape, "fan_p": 0.0, "cola_rank": 0, "norm": "pre", "gated_residual": False}


_TEST = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
             max_seq_len=128, cola_rank=16, dropout=0.0)
_TINY = dict(vocab_size=8192, d_model=256, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=768,
             max_seq_len=512, cola_rank=64, dropout=0.0)
_92M = dict(vocab_size=49152, d_model=768, n_layers=12, n_heads=12, n_kv_heads=6, d_ff=2048,
            max_seq_len=1024, fan_p=0.15, cola_rank=192, dropout=0.1)

PRESETS: dict[str, dict[str, Any]] = {
    "test": _TEST,
    "tiny": _TINY,
    "fanformer-92m": _92M,
    "transformer-test": _dense(**_TEST),
    "transformer-tiny": _dense(**_TINY),
    "transformer-92m": _dense(**_92M),
    # The Llama-shaped yardstick the engine benchmarks compare against llama.cpp on (63.6M).
    "transformer-64m": _dense(vocab_size=32000, d_model=512, n_layers=12, n_heads=8,
                              n_kv_heads=4, d_ff=2048, max_seq_len=1024, dropout=0.0),
}
