"""The calibration-free methods: int8 weight-only, bitsandbytes nf4, and RTN 4-bit.

`int8` stores per-output-channel symmetric int8 weights with bitsandbytes' LLM.int8 key
names (`weight`, `SCB`), so `bnb.nn.Linear8bitLt` can load them; on CPU our `Int8Linear`
runs them with PyTorch's int8 kernels (faster than bitsandbytes there). `nf4` uses
bitsandbytes' own NormalFloat quantizer and kernels (`quant.layers.NF4Linear`). `rtn`
rounds each group to nearest and writes the GPTQ layout. Each function swaps leaves in
place; none of them reads calibration data. bitsandbytes is imported only when nf4 is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quant.convert import gptq_layer, replace_module
from quant.layers import Int8Linear, NF4Linear
from quant.rtn import effective_group_size, rtn_quantize


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
