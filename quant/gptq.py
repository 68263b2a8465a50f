"""GPTQ (Frantar et al. 2022, arXiv 2210.17323): second-order, error-compensating rounding.

For each linear, H = 2 X^T X / n from the calibration inputs X; columns are quantized one
at a time and each column's rounding error, scaled by the inverse Hessian, is pushed onto
the columns not yet quantized (the optimal brain surgeon update), in lazy blocks of 128
columns so the big update is one matmul per block. Options follow the reference
implementation (IST-DASLab/gptq, Apache-2.0; re-implemented here, not copied): dampening
(`damp_percent` of the mean diagonal, raised when the Cholesky factorization fails), group
size, act-order (`desc_act`: columns in decreasing Hessian diagonal), static groups, and
symmetric or asymmetric grids. Output: a `QuantizedWeight` (codes, zeros, scales, g_idx)
that packs into the GPTQ v1 layout. The model-level driver is `quantize_gptq`.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.calibration import quantize_blockwise
from quant.config import QuantConfig, QuantError
from quant.convert import gptq_layer, replace_module
from quant.rtn import QuantizedWeight, effective_group_size, grid_params, quantize_codes

BLOCK_COLUMNS = 128  # lazy-update block width (the reference's default)


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / n for inputs x (n, K), in fp64 accumulation then fp32: (K, K)."""
    x = x.double()
    return (2.0 / x.shape[0] * (x.T @ x)).float()


def _inverse_cholesky(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after dampening; retries with more damping."""
    diag_mean = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp = damp_percent
    for _ in range(10):
        try:
            lower = torch.linalg.cholesky(h + damp * diag_mean * eye)
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True)
        except torch._C._LinAlgError:
            damp += 0.01
    raise QuantError("GPTQ: the Hessian is not positive definite even with heavy dampening; "
                     "use more calibration samples")


def gptq_quantize(weight: torch.Tensor, h: torch.Tensor, bits: int = 4, group_size: int = 128,
                  sym: bool = True, damp_percent: float = 0.01, act_order: bool = False,
                  static_groups: bool = False) -> QuantizedWeight:
    """Quantize weight (N, K) against Hessian h (K, K); group_size must divide K."""
    n, k = weight.shape
    if k % group_size:
        raise QuantError(f"group size {group_size} does not divide {k} input features")
    w = weight.detach().float().clone()
    h = h.clone()
    dead = torch.diagonal(h) == 0  # inputs that are always zero carry no information
    h[dead, dead] = 1
    w[:, dead] = 0
    groups = k // group_size
    static = None
    if static_groups:  # params from the original weights, before any error feedback
        static = [grid_params(w[:, g * group_size:(g + 1) * group_size], bits, sym)
                  for g in range(groups)]
    dev = w.device
    perm = (torch.argsort(torch.diagonal(h), descending=True) if act_order
            else torch.arange(k, device=dev))
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, damp_percent)

    codes = torch.zeros(n, k, dtype=torch.int32, device=dev)  # in permuted column order
    scales = torch.zeros(groups, n, device=dev)
    zeros = torch.zeros(groups, n, dtype=torch.int32, device=dev)
    block = max(BLOCK_COLUMNS // group_size, 1) * group_size  # groups never straddle blocks
    scale = zero = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()  # (N, B)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                g = int(perm[col]) // group_size
                scale, zero = static[g]
            elif col % group_size == 0:  # params of the next group, from updated weights
                g = col // group_size
                scale, zero = grid_params(w1[:, i:i + group_size], bits, sym)
                scales[g], zeros[g] = scale, zero.to(torch.int32)
            q = quantize_codes(w1[:, i], scale, zero, bits)  # (N,)
            codes[:, col] = q.to(torch.int32)
            dq = (q - zero) * scale
            err = (w1[:, i] - dq) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    inverse = torch.argsort(perm)
    codes = codes[:, inverse]  # back to the original column order
    if static is not None:
        scales = torch.stack([s for s, _ in static])
        zeros = torch.stack([z for _, z in static]).to(torch.int32)
        g_idx = torch.arange(k, dtype=torch.int32, device=dev) // group_size
    else:  # group j holds the permuted columns j*gs..(j+1)*gs-1
        g_idx = (torch.arange(k, dtype=torch.int32, device=dev) // group_size)[inverse]
    return QuantizedWeight(codes=codes.T.contiguous(), zeros=zeros, scales=scales,
                           g_idx=g_idx.to(torch.int32))


def quantize_gptq(model: nn.Module, ids: torch.Tensor, qc: QuantConfig,
                  show_progress: bool = True) -> None:
    """GPTQ every leaf linear of every block in place (GPTQ v1 layers at the end)."""
    results: dict[str, tuple[QuantizedWeight, torch.Tensor | None, int]] = {}

    def stage_fn(index: int, block: nn.Module, stage: list[str], x: torch.Tensor) -> None:
        h = hessian(x)
        for name in stage:
            linear = block.get_submodule(name)
            gs = effective_group_size(linear.in_features, qc.group_size)
            q = gptq_quantize(linear.weight, h, qc.bits, gs, qc.sym, qc.damp_percent,
                              qc.desc_act, qc.static_groups)
            linear.weight.data = q.dequantize()  # later stages see the quantized layer
            results[f"blocks.{index}.{name}"] = (q, linear.bias, gs)

    quantize_blockwise(model, ids, stage_fn, qc.true_sequential, desc="gptq",
                       show_progress=show_progress)
    for name, (q, bias, gs) in results.items():
        replace_module(model, name, gptq_layer(q, bias, qc.bits, gs))
