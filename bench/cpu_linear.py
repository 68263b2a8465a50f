"""One bf16 linear on CPU, ms per call: `F.linear` in bf16, the same in fp32 with fp32
weights kept, `CPULinear`'s fp32 chunks (server/cpu_linear.py) and the native step's bf16
kernel (quant/native_cpu.py `bf16_linear`), where it runs. What decides
`FP32_GEMM_MIN_ROWS` on a CPU without a bf16 GEMM (docs/ENGINE.md).

    .venv/bin/python bench/cpu_linear.py --shapes 512x1536 512x32000 --rows 16 64 512

Medians of `--repeats` calls each; run it on an idle machine (`uptime` is printed)."""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from quant import native_cpu
from server.cpu_linear import CPULinear, bf16_gemm_is_slow


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def calls(layer: CPULinear, w32: torch.Tensor, x: torch.Tensor, native: bool,
          repeats: int) -> list[float]:
    """The four ways of one call, ms each (nan where the native kernel does not run)."""
    x32 = x.float()
    cells = [median_ms(lambda: F.linear(x, layer.weight), repeats),
             median_ms(lambda: F.linear(x32, w32), repeats),
             median_ms(lambda: layer(x), repeats)]
    cells.append(median_ms(lambda: native_cpu.bf16_linear(x, layer.weight), repeats)
                 if native else float("nan"))
    return cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["512x1536", "512x32000"],
                   help="in x out")
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64, 512])
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args()
    print(f"# load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"{torch.get_num_threads()} threads, bf16 GEMM slow here: {bf16_gemm_is_slow()}")
    print("| in x out, rows | bf16 F.linear | fp32 F.linear, fp32 weights | fp32 chunks | "
          "native bf16 kernel |\n|---|---:|---:|---:|---:|")
    native = native_cpu.library() is not None
    with torch.inference_mode():
        for shape in args.shapes:
            k, n = map(int, shape.split("x"))
            layer = nn.Linear(k, n, bias=False).to(torch.bfloat16)
            w32 = layer.weight.float()
            layer.__class__ = CPULinear
            layer.fp32_min_rows = 1
            for rows in args.rows:
                x = torch.randn(rows, k).bfloat16()
                cells = calls(layer, w32, x, native, args.repeats)
                print(f"| {shape}, {rows} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
