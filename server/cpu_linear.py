"""bf16 linears on CPU where `F.linear` is slow: one row through `torch.mv`, and many rows in
fp32 on CPUs for which torch has no bf16 GEMM kernel.

* **One row** (a lone decoding stream): for bf16 on CPU, `F.linear` sends it through
  oneDNN's GEMM; `torch.mv` is a GEMV on the same weights. `python bench/single_row.py`
  compares the two at batch 1 (docs/ENGINE.md, "One-row linears": up to 1.36x on
  transformer-64m's linears, about 1.1x on fanformer-92m's, 0.9x on the 256-wide `tiny`).
  `torch.mv` gives the same bits as the row computed inside a batch (fp32 accumulation, one
  rounding), which keeps a request's tokens independent of its neighbours;
  tests/test_cpu_linear.py checks that on the shapes the presets use, so a torch upgrade
  that breaks it fails there, not silently in a user's batch.
* **Many rows without a bf16 GEMM** (`torch.ops.mkldnn._is_mkldnn_bf16_supported()` is
  false: x86 CPUs without AVX-512, which most laptops since Intel's 12th generation and AMD
  EPYC/Ryzen before Zen 4 are): torch then multiplies bf16 matrices with its generic loop,
  6-8x slower than MKL's fp32 GEMM on the same CPU (docs/ENGINE.md "bf16 without a bf16
  GEMM"). From `FP32_GEMM_MIN_ROWS` rows such a linear converts its weights to fp32
  `FP32_CHUNK_ELEMENTS` at a time (a chunk stays in cache between its conversion and its
  GEMM, and no fp32 copy of the model is kept) and rounds the fp32 result to bf16 once: the
  same sums in another order, so not always the same bits as one row alone; an engine
  started `--batch_invariant` keeps `F.linear`.

Only bf16 takes these paths (fp32 gained nothing on one row and fp16 lost in a check by
hand); layers with a bias keep `F.linear` (a fused bias add may round differently).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FP32_GEMM_MIN_ROWS = 16  # below, torch's bf16 loop is as fast (8 rows) or faster
FP32_CHUNK_ELEMENTS = 1 << 18  # weights per fp32 chunk: 1 MiB


def bf16_gemm_is_slow() -> bool:
    """Whether torch multiplies bf16 matrices on this CPU with its generic loop (no oneDNN
    bf16 kernel: no AVX-512 and no AMX)."""
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a torch without the op: assume the fast path
        return False


class CPULinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state dict) whose one-row inputs use `torch.mv`
    and, where `fp32_min_rows` is set, whose inputs of that many rows or more use fp32."""

    fp32_min_rows: int | None = None

    def _one_row(self, x: torch.Tensor) -> bool:
        return x.numel() == self.in_features and x.dtype == self.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._one_row(x):
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        rows = x.numel() // self.in_features
        if self.fp32_min_rows is not None and rows >= self.fp32_min_rows and \
                x.dtype == self.weight.dtype and not torch.is_grad_enabled():
            y = self._fp32_chunks(x.reshape(rows, self.in_features))
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def _fp32_chunks(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x (M, K) bf16 -> (M, N) bf16 (into `out` when given), built chunk of outputs by
        chunk, each chunk's weights (C, K) converted to fp32 right before its GEMM writes
        columns of y."""
        n, k = self.weight.shape
        chunk = max(16, FP32_CHUNK_ELEMENTS // k)
        xf = x.float()  # (M, K)
        y = torch.empty(x.shape[0], n, device=x.device)  # (M, N) fp32
        for n0 in range(0, n, chunk):  # a column slice is a BLAS matrix (row stride N)
            torch.mm(xf, self.weight[n0:n0 + chunk].float().T, out=y[:, n0:n0 + chunk])
        return y.to(x.dtype) if out is None else out.copy_(y)

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (M, N) <- self(x) for x (M, K), the same bits, written in place without a
        temporary and its copy (server/native_step.py's phased step). Inference only:
        `out=` takes no autograd."""
        if self._one_row(x):
            torch.mv(self.weight, x.reshape(-1), out=out.view(-1))
        elif self.fp32_min_rows is not None and x.shape[0] >= self.fp32_min_rows:
            self._fp32_chunks(x, out)
        else:  # what F.linear runs for a 2-D input without a bias
            torch.mm(x, self.weight.T, out=out)


def use_cpu_linears(model: nn.Module, batch_invariant: bool = False) -> int:
    """Turn the model's bias-free bf16 CPU `nn.Linear`s into `CPULinear`s in place, with
    fp32 GEMMs from `FP32_GEMM_MIN_ROWS` rows where `bf16_gemm_is_slow()` and the engine is
    not `batch_invariant`; returns how many. Other modules (quantized layers, layers with a
    bias) are left alone."""
    fp32_min_rows = FP32_GEMM_MIN_ROWS if bf16_gemm_is_slow() and not batch_invariant else None
    count = 0
    for module in model.modules():
        if (type(module) in (nn.Linear, CPULinear) and module.bias is None
                and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu"):
            count += type(module) is nn.Linear
            module.__class__ = CPULinear
            module.fp32_min_rows = fp32_min_rows
    if count and fp32_min_rows is not None:
        log.info("bf16 linears: torch has no bf16 GEMM on this CPU (no AVX-512), so those of "
                 "%d+ rows run fp32 GEMMs over weight chunks", fp32_min_rows)
    return count
