"""Micro-benchmark of the CPU kernels a quantized linear can use, side by side, per shape.

    nice -n 10 python bench/bench_quant_kernels.py                 # demo + 768 shapes
    python bench/bench_quant_kernels.py --shapes 64x256 --rows 1 5 --min_run_time 0.01

For each (K, N) shape and row count M it times one call of each candidate, activation
quantization and output scaling included (what a layer's forward pays), and prints the
time in microseconds and the ratio to bf16 `F.linear` measured in the same run. The
candidates run interleaved, shape by shape, so machine load hits them alike; on a shared
machine only the ratios mean anything, and the load average is printed with them.

  bf16 dense       F.linear on a cached bf16 weight (the unquantized model's kernel)
  w8 weight-only   aten `_weight_int8pack_mm`, bf16 activations
  w4 weight-only   aten `_weight_int4pack_mm_for_cpu`, groups of 64, bf16 activations
  w4 native        the native kernel (quant/native_cpu.c), the same 4-bit weights, int8
                   activations per group of 64 (column shown where this CPU runs it)
  w8 native        the native kernel's 8-bit path, the same int8 weights, int8 activations
                   per group of 128 (shown where its AVX-512 build runs)
  fbgemm per-tensor  `quantized::linear_dynamic` (the old > 4-row path; not batch-invariant)
  w8a8 _int_mm     per-row int8 activations, exact int32 GEMM (`torch._int_mm`), then the
                   row and column scales: what `quant.layers` runs on big layers where
                   oneDNN's int8 linear is not exact
  w8a8 oneDNN      the same integers through oneDNN's int8 linear on a prepacked weight
                   (`quant.w8a8.w8a8_kernel`): what big layers run where it is exact (same
                   bits as _int_mm; column shown only there)
  w8a8 fbgemm      the same integers through fbgemm: the codes of each row (scale 1) plus
                   one row holding -128 and 127 pin fbgemm's per-tensor grid to scale 1,
                   zero point 128, so its int32 sums are exact too (same bits as _int_mm)

(A first try of `onednn::qlinear_pointwise` on 2026-11-29 took 0.6-157 ms at 1-4 rows and
was dropped; with the weight prepacked once and warmed up per row count, as here, it is the
"w8a8 oneDNN" column.)

It also checks each candidate's batch invariance (row i of an M-row call equals the call
on row i alone, bitwise) and prints it next to the times. Knows torch, not our layers'
internals except `quant.w8a8`, the kernels under test.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quant import native_cpu  # noqa: E402
from quant.w8a8 import onednn_int8_exact, quantize_rows, w8a8_kernel, w8a8_linear  # noqa: E402

# the demo checkpoint's linear shapes (K -> N), then fanformer-92m-like full-rank ones
DEFAULT_SHAPES = ["256x64", "64x256", "64x768", "768x64", "256x218", "256x8192",
                  "768x768", "768x3072"]


def candidates(k: int, n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.05  # (N, K)
    absmax = w.abs().amax(1).clamp(min=1e-8)
    w8 = torch.round(w * (127 / absmax[:, None])).to(torch.int8)  # (N, K)
    w_scale = absmax / 127
    wb = w.to(torch.bfloat16)
    out = {"bf16 dense": lambda x: F.linear(x, wb)}
    out["w8 weight-only"] = lambda x: torch.ops.aten._weight_int8pack_mm(
        x, w8, w_scale.to(torch.bfloat16))
    group = native_cpu.activation_group(k)
    if native_cpu.full_build() and group:
        out["w8 native"] = native_cpu.NativeKernel(
            *native_cpu.int8_as_codes(w8, w_scale, group), group, bits=8)
    if k % 64 == 0:
        pad = -n % 16
        codes = torch.randint(0, 16, (n + pad, k), generator=g, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.stack([torch.rand(k // 64, n + pad, generator=g) * 0.01,
                          torch.randn(k // 64, n + pad, generator=g) * 0.01], -1)
        sz = sz.to(torch.bfloat16)
        out["w4 weight-only"] = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, packed, 64, sz)[:, :n]
        if native_cpu.library() is not None:
            zeros = torch.full((k // 64, n), 8)
            out["w4 native"] = native_cpu.NativeKernel(codes[:n].T, zeros, sz[:, :n, 0].float(),
                                                       64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(
            w8, w_scale.double(), torch.zeros(n, dtype=torch.long), 0)
        prepacked = torch.ops.quantized.linear_prepack(qw, None)
    out["fbgemm per-tensor"] = lambda x: torch.ops.quantized.linear_dynamic(
        x.float(), prepacked, True)
    w8t = w8.T.contiguous()  # (K, N)
    out["w8a8 _int_mm"] = lambda x: w8a8_linear(x, w8t, w_scale)
    if onednn_int8_exact():  # timed even where too slow to be chosen (onednn_int8_fast)
        out["w8a8 oneDNN"] = w8a8_kernel(w8, w_scale, onednn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw1 = torch._make_per_channel_quantized_tensor(
            w8, w_scale.double(), torch.zeros(n, dtype=torch.long), 0)
        pk1 = torch.ops.quantized.linear_prepack(qw1, None)
    cal = torch.zeros(1, k)
    cal[0, 0], cal[0, 1] = -128, 127

    def fbgemm_rows(x):
        amax = x.abs().amax(-1, keepdim=True).float().clamp_(min=1e-30)
        codes = (x * (127 / amax)).round_()
        y = torch.ops.quantized.linear_dynamic(torch.cat([cal, codes]), pk1, False)[1:]
        return y * (amax / 127)
    out["w8a8 fbgemm"] = fbgemm_rows
    return out


def invariant(fn, k: int, rows: int) -> bool:
    x = torch.randn(rows, k).to(torch.bfloat16)
    together = fn(x)
    return all(torch.equal(together[i:i + 1], fn(x[i:i + 1])) for i in range(rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="KxN per shape")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--min_run_time", type=float, default=0.2,
                   help="seconds per measurement (blocked_autorange)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; the quantize_rows "
          f"sanity check: {quantize_rows(torch.ones(1, 4))[0].tolist()}")
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        fns = candidates(k, n)
        print(f"\nK={k} N={n}  (us per call; ratio = bf16 time / this time; inv = "
              "batch-invariant at that M)")
        print("| M | " + " | ".join(fns) + " |")
        print("|---" * (len(fns) + 1) + "|")
        for rows in args.rows:
            x = torch.randn(rows, k).to(torch.bfloat16)
            times = {}
            for name, fn in fns.items():
                fn(x)  # warm up (oneDNN primitive caches)
                t = benchmark.Timer("fn(x)", globals={"fn": fn, "x": x})
                times[name] = t.blocked_autorange(min_run_time=args.min_run_time).median
            base = times["bf16 dense"]
            cells = [f"{times[name] * 1e6:.0f} ({base / times[name]:.2f}x"
                     f"{'' if invariant(fn, k, rows) else ', NOT inv'})"
                     for name, fn in fns.items()]
            print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
