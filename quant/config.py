"""What a quantized checkpoint says about itself: `quant_config.json`.

One file describes the whole checkpoint. Its top level carries the fields GPTQ/AWQ tools
read (`bits`, `group_size`, `sym`, `desc_act`, `quant_method`, `checkpoint_format`, ...);
the `fanformer` section lists every quantized module with its on-disk format, so loading
never guesses from tensor names or shapes. Formats (docs/QUANTIZATION.md):

  gptq  GPTQ v1 tensors qweight/qzeros/scales/g_idx (gptq and rtn write this)
  awq   AutoAWQ GEMM tensors qweight/qzeros/scales, plus `input_scale` where AWQ's scale
        could not be folded into the layer before
  int8  per-output-channel symmetric int8 `weight` + `SCB` (bitsandbytes' key names)
  nf4   bitsandbytes 4-bit NormalFloat (Params4bit's serialized state)

This module knows JSON and validation only; `layers.py` knows how to run each format.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fanformer.checkpoint import QUANT_CONFIG_FILE  # the name plain loading checks for

METHODS = ("gptq", "awq", "rtn", "int8", "nf4")
FORMATS = ("gptq", "awq", "int8", "nf4")
LM_HEAD_CHOICES = ("none", "int8", "int4")
GROUP_SIZES = (-1, 32, 64, 128, 256)
SCHEMA_VERSION = 1


class QuantError(Exception):
    """Bad quantization input or a bad quantized checkpoint: one sentence for the user."""


@dataclass(frozen=True)
class LayerSpec:
    """How one leaf linear is stored: its format and (for gptq/awq) bits and group size."""

    format: str
    in_features: int
    out_features: int
    bias: bool = False
    bits: int = 8
    group_size: int = 0
    input_scale: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise QuantError(f"unknown layer format {self.format!r}; valid: {', '.join(FORMATS)}")


@dataclass(frozen=True)
class QuantConfig:
    """The method and its settings, as the CLI received them, plus the per-module layout."""

    method: str = field(metadata={"help": "gptq, awq, rtn, int8 or nf4"})
    bits: int = field(default=4, metadata={"help": "weight bits (gptq, rtn: 2/3/4/8; awq: 4)"})
    group_size: int = field(
        default=128, metadata={"help": "inputs per scale group (-1: one group per row)"})
    sym: bool = field(default=True, metadata={"help": "symmetric grid (zero point 2^(bits-1))"})
    desc_act: bool = field(
        default=False, metadata={"help": "GPTQ act-order: quantize columns by Hessian diag"})
    static_groups: bool = field(
        default=False, metadata={"help": "GPTQ: fix group params before act-order updates"})
    damp_percent: float = field(default=0.01, metadata={"help": "GPTQ Hessian dampening"})
    true_sequential: bool = field(default=True, metadata={"help": "GPTQ: sub-layer order"})
    lm_head: str = field(default="none", metadata={"help": "none, int8 or int4 (untied)"})
    layers: dict[str, LayerSpec] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantError(f"unknown method {self.method!r}; valid methods: {', '.join(METHODS)}")
        if self.lm_head not in LM_HEAD_CHOICES:
            raise QuantError(f"lm_head must be one of {', '.join(LM_HEAD_CHOICES)}, "
                             f"got {self.lm_head!r}")
        valid_bits = {"gptq": (2, 3, 4, 8), "awq": (4,), "rtn": (2, 3, 4, 8), "int8": (8,),
                      "nf4": (4,)}[self.method]
        if self.bits not in valid_bits:
            raise QuantError(f"--bits {self.bits} is not supported by {self.method}; "
                             f"valid: {', '.join(map(str, valid_bits))}")
        if self.method in ("gptq", "awq", "rtn") and self.group_size not in GROUP_SIZES:
            raise QuantError(f"--group_size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                             f"got {self.group_size}")
        if not 0 < self.damp_percent < 1:
            raise QuantError(f"damp_percent must be in (0, 1), got {self.damp_percent}")

    # ---- serialization ----
    def to_json(self) -> dict[str, Any]:
        """The ecosystem's fields at the top level, ours under `fanformer`."""
        packed = self.method in ("gptq", "rtn", "awq")
        body: dict[str, Any] = {
            "quant_method": {"rtn": "gptq"}.get(self.method, self.method),
            "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
            "desc_act": self.desc_act, "static_groups": self.static_groups,
            "damp_percent": self.damp_percent, "true_sequential": self.true_sequential,
            "lm_head": self.lm_head != "none",
        }
        if self.method in ("gptq", "rtn"):
            body.update(checkpoint_format="gptq", pack_dtype="int32",
                        dynamic=self._dynamic_group_sizes())
        elif self.method == "awq":
            body.update(version="gemm", zero_point=True, w_bit=self.bits,
                        q_group_size=self.group_size)
        body["fanformer"] = {
            "schema_version": SCHEMA_VERSION, "method": self.method, "lm_head": self.lm_head,
            "packed": packed, "layers": {name: asdict(s) for name, s in self.layers.items()},
            **self.extra,
        }
        return body

    def _dynamic_group_sizes(self) -> dict[str, dict[str, int]]:
        """GPTQModel's per-module overrides (`+:regex`) for layers with another group size."""
        out = {}
        for name, spec in self.layers.items():
            if spec.format == "gptq" and spec.group_size != self.group_size:
                out["+:^" + name.replace(".", r"\.") + "$"] = {
                    "bits": spec.bits, "group_size": spec.group_size}
        return out

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / QUANT_CONFIG_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> QuantConfig:
        path = Path(directory) / QUANT_CONFIG_FILE
        try:
            body = json.loads(path.read_text())
            ours = body["fanformer"]
            if ours.get("schema_version") != SCHEMA_VERSION:
                raise QuantError(f"{path} has schema_version {ours.get('schema_version')!r}; "
                                 f"this version reads {SCHEMA_VERSION}")
            layers = {name: LayerSpec(**spec) for name, spec in ours["layers"].items()}
            known = {"schema_version", "method", "lm_head", "packed", "layers"}
            return cls(method=ours["method"], bits=body["bits"], group_size=body["group_size"],
                       sym=body["sym"], desc_act=body["desc_act"],
                       static_groups=body["static_groups"], damp_percent=body["damp_percent"],
                       true_sequential=body["true_sequential"], lm_head=ours["lm_head"],
                       layers=layers, extra={k: v for k, v in ours.items() if k not in known})
        except FileNotFoundError:
            raise QuantError(f"{path} is missing") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise QuantError(f"{path} is not a valid quantization config ({e!r})") from None
