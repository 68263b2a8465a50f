"""One-row bf16 linears on CPU through `torch.mv`: the GEMV a lone decoding stream runs.

When a step holds one token (one stream, decoding), every linear of the model multiplies
a single row. For bf16 on CPU, `F.linear` sends that row through oneDNN's GEMM; `torch.mv`
is a GEMV on the same weights. `python bench/single_row.py` compares the two at batch 1
(docs/ENGINE.md, "One-row linears": up to 1.36x on transformer-64m's linears, about 1.1x
on fanformer-92m's, 0.9x on the 256-wide `tiny`). Only bf16 takes this path (fp32 gained
nothing and fp16 lost in a check by hand); layers with a bias keep `F.linear` (a
fused bias add may round differently).

`torch.mv` gives the same bits as the row computed inside a batch (fp32 accumulation, one
rounding), which keeps a request's tokens independent of its neighbours;
tests/test_single_row.py checks that on the shapes the presets use, so a torch upgrade that
breaks it fails there, not silently in a user's batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SingleRowLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state dict) whose one-row inputs use `torch.mv`."""

    def _one_row(self, x: torch.Tensor) -> bool:
        return x.numel() == self.in_features and x.dtype == self.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._one_row(x):
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out <- self(x), the same bits; a one-row x is written in place, without the
        temporary and the copy (server/native_step.py's phased step). Inference only:
        `out=` takes no autograd."""
        if self._one_row(x):
            torch.mv(self.weight, x.reshape(-1), out=out.view(-1))
        else:
            out.copy_(self(x))


def use_mv_for_single_rows(model: nn.Module) -> int:
    """Turn the model's bias-free bf16 CPU `nn.Linear`s into `SingleRowLinear`s in place;
    returns how many. Other modules (quantized layers, layers with a bias) are left alone."""
    count = 0
    for module in model.modules():
        if (type(module) is nn.Linear and module.bias is None
                and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu"):
            module.__class__ = SingleRowLinear
            count += 1
    return count
