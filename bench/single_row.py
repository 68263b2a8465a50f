"""One decode step's linears at batch 1: bf16 `F.linear` against `torch.mv` (server/single_row.py).

    python bench/single_row.py --presets transformer-64m fanformer-92m tiny --rounds 4

For each preset (random weights, bf16), every `nn.Linear` of the model runs once on a
one-row input, as in a batch-1 decode step; the step's time is the median of --repeats
blocks of --steps steps. The two kernels alternate --rounds times in one process, so their
ratio, not the milliseconds, is the result. Run it on an idle machine; the load average is
printed.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from bench_engine import build_model  # bench/ is on sys.path when run as a script
from torch import nn

from server.single_row import SingleRowLinear


def step_ms(linears: list[nn.Linear], inputs: list[torch.Tensor], kernel: type,
            steps: int, repeats: int) -> float:
    for m in linears:
        if m.bias is None:  # what use_mv_for_single_rows converts
            m.__class__ = kernel
    with torch.inference_mode():
        for _ in range(4):
            for m, x in zip(linears, inputs):
                m(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                for m, x in zip(linears, inputs):
                    m(x)  # (1, 1, d_out)
            times.append((time.perf_counter() - start) / steps)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["transformer-64m", "fanformer-92m", "tiny"])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    for preset in args.presets:
        model = build_model(preset, torch.bfloat16)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        inputs = [torch.randn(1, 1, m.in_features, dtype=torch.bfloat16) for m in linears]
        print(f"{preset}: {len(linears)} linears")
        for r in range(args.rounds):
            a = step_ms(linears, inputs, nn.Linear, args.steps, args.repeats)
            b = step_ms(linears, inputs, SingleRowLinear, args.steps, args.repeats)
            print(f"  round {r}: F.linear {a:.2f} ms, torch.mv {b:.2f} ms, "
                  f"F.linear / torch.mv {a / b:.2f}", flush=True)


if __name__ == "__main__":
    main()
