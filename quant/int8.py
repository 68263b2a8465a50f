"""The calibration-free methods: int8 weight-only, bitsandbytes nf4, and RTN 4-bit.

`int8` stores per-output-channel symmetric int8 weights with bitsandbytes' LLM.int8 key
names (`weight`, `SCB`), so `bnb.nn.Linear8bitLt` can load them; on CPU our `Int8Linear`
runs them with PyTorch's int8 kernels (faster than bitsandbytes there). `nf4` uses
bitsandbytes' own NormalFloat quantizer and kernels (`NF4Linear`). `rtn` rounds each
group to nearest and writes the GPTQ layout. Each function swaps leaves in place; none
of them reads calibration data. bitsandbytes is imported only when nf4 is used.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch
import torch.nn.functional as F
from torch import nn

from quant.convert import gptq_layer, replace_module
from quant.layers import QuantLinear
from quant.rtn import effective_group_size, rtn_quantize

NF4_BLOCK = 64  # bitsandbytes' default blocksize for 4-bit


def _bnb():
    """Import bitsandbytes quietly (on CPU it logs a harmless 'kernels' hub warning)."""
    with contextlib.redirect_stderr(io.StringIO()):
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes
        import bitsandbytes.functional
    return bitsandbytes


class NF4Linear(QuantLinear):
    """bitsandbytes 4-bit NormalFloat: `weight` uint8 (N*K/2, 1), `absmax` fp32 per block of
    64 weights (row-major), `quant_map` fp32 (16,) the NF4 code book."""

    def __init__(self, in_features, out_features, bias=False, device="meta"):
        super().__init__(in_features, out_features, bias, device)
        numel = in_features * out_features
        self.register_buffer("weight", torch.empty((numel // 2, 1), dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("absmax", torch.empty(-(-numel // NF4_BLOCK), device=device))
        self.register_buffer("quant_map", torch.empty(16, device=device))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> NF4Linear:
        bnb = _bnb()
        n, k = weight.shape
        packed, state = bnb.functional.quantize_4bit(
            weight.detach().to(torch.bfloat16).contiguous(), blocksize=NF4_BLOCK,
            quant_type="nf4")
        layer = cls(k, n, bias is not None, device="cpu")
        layer.weight, layer.absmax, layer.quant_map = packed, state.absmax.float(), state.code
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    def _state(self):
        bnb = _bnb()
        return bnb.functional.QuantState(
            absmax=self.absmax, shape=torch.Size([self.out_features, self.in_features]),
            code=self.quant_map, blocksize=NF4_BLOCK, quant_type="nf4", dtype=torch.bfloat16)

    def dequantize(self):
        bnb = _bnb()
        return bnb.functional.dequantize_4bit(self.weight, self._state()).float()

    def _small_kernel(self):
        """bitsandbytes' fused AVX512-BF16 nf4 kernel, on its repacked CPU layout."""
        bnb = _bnb()
        if self.out_features % 32 or self.in_features % 2:
            return None
        try:
            weight, state = bnb.functional._convert_weight_packed_for_cpu(
                self.weight.clone(), self._state())
        except (AttributeError, AssertionError, RuntimeError):
            return None  # an older bitsandbytes or a CPU without the kernel: reference path
        return lambda x: bnb.matmul_4bit(x, weight, quant_state=state)


def quantize_rtn(model: nn.Module, names: list[str], bits: int, group_size: int,
                 sym: bool) -> None:
    """Round-to-nearest every named leaf linear in place (GPTQ v1 layout)."""
    for name in names:
        linear = model.get_submodule(name)
        gs = effective_group_size(linear.in_features, group_size)
        q = rtn_quantize(linear.weight, bits, gs, sym)
        replace_module(model, name, gptq_layer(q, linear.bias, bits, gs))


def quantize_int8(model: nn.Module, names: list[str]) -> None:
    """Per-channel int8 weight-only for every named leaf linear, in place."""
    from quant.layers import Int8Linear

    for name in names:
        linear = model.get_submodule(name)
        replace_module(model, name, Int8Linear.from_float(linear.weight, linear.bias))


def quantize_nf4(model: nn.Module, names: list[str]) -> None:
    """bitsandbytes nf4 for every named leaf linear, in place."""
    for name in names:
        linear = model.get_submodule(name)
        replace_module(model, name, NF4Linear.from_float(linear.weight, linear.bias))


def quantize_lm_head(model: nn.Module, kind: str, group_size: int = 128) -> None:
    """Untie and quantize the LM head ('int8' or 'int4'); the embedding keeps its weight."""
    from quant.layers import Int8Linear

    weight = model.lm_head.weight.detach().clone()
    if kind == "int8":
        head = Int8Linear.from_float(weight)
    else:
        gs = effective_group_size(weight.shape[1], group_size)
        head = gptq_layer(rtn_quantize(weight, 4, gs, True), None, 4, gs)
    model.lm_head = head


def layer_error(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> float:
    """Relative output error of `layer` against the float weight on inputs x (tests, docs)."""
    with torch.no_grad():
        ref = F.linear(x.float(), weight.float())
        return float((layer(x).float() - ref).norm() / ref.norm())
