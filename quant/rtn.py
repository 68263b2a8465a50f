"""The integer grid every method shares: group-wise scales/zero points and round-to-nearest.

`rtn` is the `--method rtn` baseline (no calibration data) and the rounding step inside
GPTQ and AWQ. Conventions follow the GPTQ reference quantizer: the range of a group always
includes 0; symmetric grids put the zero point at 2^(bits-1) (8 at 4 bits); asymmetric
zero points are clamped to >= 1 so they fit the GPTQ v1 layout (which stores zero - 1).
This module knows tensors only, not layers, files or kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """Unsigned codes (K, N), zero points and scales (G, N), group of each input row (K,)."""

    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The weight (N, K) these codes stand for, in fp32."""
        g = self.g_idx.long()
        return ((self.codes - self.zeros[g]).float() * self.scales[g]).T.contiguous()


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point of rows w (R, C) on a 2^bits grid: (R,), (R,).

    Scales are rounded to fp16 here, because that is how they are stored: the codes must
    be chosen against the scale the reader will see.
    """
    maxq = (1 << bits) - 1
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        scale = 2 * hi / maxq
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / scale.clamp(min=1e-12)).clamp(1, maxq)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(torch.float16).float().clamp(min=float(torch.finfo(torch.float16).tiny))
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bits: int) -> torch.Tensor:
    """Codes of w (..., R) with per-element broadcastable scale and zero: round and clamp."""
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  bits: int) -> torch.Tensor:
    """Quantize then dequantize (what the layer will compute with)."""
    return (quantize_codes(w, scale, zero, bits) - zero) * scale


def effective_group_size(in_features: int, group_size: int) -> int:
    """The group size used for a layer with `in_features` inputs.

    The CLI's group size applies where it divides the input width; otherwise the largest
    halving of it (down to 32) that does, so a CoLA factor of rank 192 gets groups of 64;
    layers narrower than that are quantized per output channel (one group per row).
    """
    if group_size <= 0 or group_size >= in_features:
        return in_features
    size = group_size
    while size >= 32:
        if in_features % size == 0:
            return size
        size //= 2
    return in_features


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int,
                 sym: bool = True) -> QuantizedWeight:
    """Round-to-nearest group-wise quantization of weight (N, K)."""
    n, k = weight.shape
    w = weight.detach().float()
    groups = k // group_size
    wg = w.reshape(n, groups, group_size)  # (N, G, gs)
    scale, zero = grid_params(wg.reshape(n * groups, group_size), bits, sym)
    scale, zero = scale.reshape(n, groups, 1), zero.reshape(n, groups, 1)
    codes = quantize_codes(wg, scale, zero, bits).reshape(n, k)
    return QuantizedWeight(codes=codes.T.to(torch.int32).contiguous(),
                           zeros=zero[..., 0].T.to(torch.int32).contiguous(),
                           scales=scale[..., 0].T.contiguous(),
                           g_idx=torch.arange(k, dtype=torch.int32, device=w.device)
                           // group_size)
