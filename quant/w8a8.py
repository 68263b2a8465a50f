"""The exact int8 GEMM of the w8a8 kernel: rows quantized to int8 each on its own grid,
multiplied by per-channel int8 weights with int32 sums, then both scales.

Integer sums are exact in any order, so a row's result never depends on the other rows or
on how many there are: the property quantized layers' batch invariance rests on
(quant/layers.py). Two GEMMs give those sums: oneDNN's int8 linear on a prepacked weight
(AMX/VNNI, used where one-time checks find it exact and fast) and `torch._int_mm`
(everywhere else); both give the same bits, which tests/test_quant_layers.py checks.
"""

from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# oneDNN's int8 linear gets rows in multiples of this: at 1-5 rows it picks its slow
# reference kernel for many shapes (ms instead of us; seen with ONEDNN_VERBOSE=1, torch
# 2.13), never at 6 or more in a grid of this repo's shapes; whole tiles also bound the
# number of shapes it JIT-compiles
ONEDNN_ROW_TILE = 16


@functools.cache
def activation_qmax() -> int:
    """The int8 activation range: +-127, or +-63 (fbgemm's `reduce_range`) on CPUs without
    VNNI/AMX int8 dot products, whose u8 x s8 pair sums saturate int16 at full range."""
    return 127 if torch.cpu._is_vnni_supported() else 63


def quantize_rows(x: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> int8 codes (M, K) and fp32 scales (M, 1), each row on its own grid.

    The largest |x| of a row maps to x * (qmax / amax), within an ulp of qmax, so it
    rounds to qmax and no clamp is needed.
    """
    amax = x.abs().amax(-1, keepdim=True).float().clamp_(min=1e-30)  # (M, 1)
    q = (x * (qmax / amax)).round_().to(torch.int8)  # (M, K)
    return q, amax / qmax


def w8a8_linear(x: torch.Tensor, w8t: torch.Tensor, w_scale: torch.Tensor,
                qmax: int = 127) -> torch.Tensor:
    """x (M, K) times int8 weights w8t (K, N) with per-channel scales (N,): fp32 (M, N).

    `torch._int_mm` accumulates in int32, exactly, so the result of a row is the same
    whatever GEMM blocking the row count selects; the scaling is elementwise. The portable
    path, and the reference that `w8a8_kernel`'s oneDNN path must equal bit for bit.
    """
    return _scaled_sums(x, lambda q: torch._int_mm(q, w8t).float(), w_scale, qmax)


def _scaled_sums(x: torch.Tensor, int_sums, w_scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """x (M, K) quantized by rows, `int_sums(q)` (the exact int32 sums as fp32, (M, N)), then
    the row scale and the channel scale, in this order: the one place that order is fixed,
    so both GEMMs give the same bits."""
    q, sx = quantize_rows(x, qmax)
    return int_sums(q).mul_(sx).mul_(w_scale)


def _onednn_int8_sums(w8: torch.Tensor):
    """w8 (N, K) int8 -> a callable q (M, K) int8 -> (M, N) fp32 holding the exact int32
    sums q @ w8.T, through oneDNN's int8 linear on a weight prepacked once for this CPU
    (AMX or VNNI tiles). Scales of 1 and zero points of 0, so oneDNN only converts the sums
    to fp32, as `.float()` does; the real scales are applied after, by `_scaled_sums`."""
    packed = torch.ops.onednn.qlinear_prepack(w8, None)
    ones = torch.ones(w8.shape[0], dtype=torch.float32, device=w8.device)
    zeros = torch.zeros(w8.shape[0], dtype=torch.long, device=w8.device)

    def sums(q: torch.Tensor) -> torch.Tensor:
        rows = q.shape[0]
        padded = -(-rows // ONEDNN_ROW_TILE) * ONEDNN_ROW_TILE
        if padded != rows:  # zero rows: exact sums of 0, and they never touch the others
            q = F.pad(q, (0, 0, 0, padded - rows))
        out = torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, packed, ones, zeros, None, 1.0, 0,
                                                 torch.float32, "none", [], "")
        return out[:rows]  # (M, N)
    return sums


@functools.cache
def onednn_int8_exact() -> bool:
    """Whether oneDNN's int8 linear runs here and gives `torch._int_mm`'s sums bit for bit
    (checked once on random codes at full range, several row counts). Where it does, it is
    up to 3x faster than `_int_mm` (the LM head at 16 rows) and on a par or better on the
    other layers measured (docs/QUANTIZATION.md)."""
    if not (hasattr(torch.ops.onednn, "qlinear_prepack") and torch.backends.mkldnn.is_available()):
        return False
    g = torch.Generator().manual_seed(0)
    w8 = torch.randint(-127, 128, (48, 256), generator=g, dtype=torch.int8, device="cpu")
    q = torch.randint(-activation_qmax(), activation_qmax() + 1, (17, 256), generator=g,
                      dtype=torch.int8, device="cpu")
    try:
        sums = _onednn_int8_sums(w8)
        return all(torch.equal(sums(q[:m]), torch._int_mm(q[:m], w8.T.contiguous()).float())
                   for m in (1, 5, 17))
    except RuntimeError:  # a torch built without oneDNN's int8 ops, or a CPU it rejects
        return False


def _best_seconds(fn, repeats: int = 3) -> float:
    fn()  # oneDNN compiles its kernel on the first call
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def onednn_int8_fast() -> bool:
    """Whether to run the w8a8 GEMM on oneDNN: exact here (`onednn_int8_exact`) and not
    slower than `torch._int_mm` on one 16 x 512 x 512 product. On some CPUs oneDNN gives the
    right sums from its reference kernel at every shape (`ref_int8:any` in ONEDNN_VERBOSE=1;
    docs/QUANTIZATION.md has the figures and the command), which made a 4-bit model's prefill
    hundreds of times slower. Both GEMMs give the same bits, so this choice changes the
    speed only, never a token; 2x of slack keeps it from flapping where the two are close.
    Logged at INFO when oneDNN is passed over, with both timings."""
    if not onednn_int8_exact():
        return False
    g = torch.Generator().manual_seed(0)
    w8 = torch.randint(-127, 128, (512, 512), generator=g, dtype=torch.int8)
    q = torch.randint(-127, 128, (ONEDNN_ROW_TILE, 512), generator=g, dtype=torch.int8)
    onednn, w8t = _onednn_int8_sums(w8), w8.T.contiguous()
    onednn_s = _best_seconds(lambda: onednn(q))
    int_mm_s = _best_seconds(lambda: torch._int_mm(q, w8t))
    fast = onednn_s <= 2 * int_mm_s
    log.log(logging.DEBUG if fast else logging.INFO,
            "w8a8 GEMM: %s (oneDNN int8 %.3f ms, torch._int_mm %.3f ms on 16 x 512 x 512)",
            "oneDNN" if fast else "torch._int_mm, oneDNN runs a slow kernel on this CPU",
            onednn_s * 1e3, int_mm_s * 1e3)
    return fast


@functools.cache
def int8_gemm_fast() -> bool:
    """Whether this CPU's w8a8 GEMM (`w8a8_kernel`'s choice) is at least as fast as an fp32
    GEMM of the same shape, 64 x 512 x 512. Where it is not (no VNNI: torch._int_mm is then
    a plain loop, 20-50x slower than the fp32 GEMM on an AVX2 AMD EPYC), quant/layers.py
    runs its weight-only kernels at every row count instead. Logged at INFO when slow."""
    g = torch.Generator().manual_seed(0)
    w8 = torch.randint(-127, 128, (512, 512), generator=g, dtype=torch.int8)
    q = torch.randint(-127, 128, (64, 512), generator=g, dtype=torch.int8)
    if onednn_int8_fast():
        sums = _onednn_int8_sums(w8)
        int8_s = _best_seconds(lambda: sums(q))
    else:
        w8t = w8.T.contiguous()
        int8_s = _best_seconds(lambda: torch._int_mm(q, w8t))
    qf, wf = q.float(), w8.T.float().contiguous()
    fp32_s = _best_seconds(lambda: torch.mm(qf, wf))
    fast = int8_s <= fp32_s
    log.log(logging.DEBUG if fast else logging.INFO,
            "w8a8 GEMM %s (int8 %.3f ms, fp32 %.3f ms on 64 x 512 x 512)",
            "fast" if fast else "slow on this CPU: quantized layers run their weight-only "
            "kernels at every row count", int8_s * 1e3, fp32_s * 1e3)
    return fast


def w8a8_kernel(w8: torch.Tensor, w_scale: torch.Tensor, qmax: int = 127,
                onednn: bool | None = None):
    """A callable x (M, K) -> fp32 (M, N) computing `w8a8_linear` with the int8 weights w8
    (N, K) and per-channel scales w_scale (N,), on the fastest exact GEMM this CPU has
    (`onednn` forces the choice: tests and benches run both GEMMs)."""
    w_scale = w_scale.float()
    if onednn is None:
        onednn = w8.device.type == "cpu" and onednn_int8_fast()
    if onednn:
        sums = _onednn_int8_sums(w8.contiguous())
        return lambda x: _scaled_sums(x, sums, w_scale, qmax)
    w8t = w8.T.contiguous()  # (K, N)
    return lambda x: w8a8_linear(x, w8t, w_scale, qmax)


def per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of w (N, K): codes (N, K) and fp32 scales (N,)."""
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale
