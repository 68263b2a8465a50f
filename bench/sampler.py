"""The sampler's batched draw (server/sampling.py `_draw`) with its first draw in C
(quant/native_sample.c) against the same draw all in torch, on random logits.

    .venv/bin/python bench/sampler.py --rows 1 16 64

Medians of `--repeats` calls each, alternating the two paths; T 0.8 and top_p 0.95 (what
users send), bf16 logits of a 32k vocabulary scaled so that ~5 % of rows miss their nucleus.
Run it on an idle machine (`uptime` is printed) and compare figures of one run only."""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import server.sampling as sampling
from server.sampling_params import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    print(f"# load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"{torch.get_num_threads()} threads")
    print("| rows | torch ms | native ms | torch / native |\n|---:|---:|---:|---:|")
    native_first_draw = sampling._native_first_draw
    for rows in args.rows:
        g = torch.Generator().manual_seed(rows)
        logits = (torch.randn(rows, args.vocab, generator=g) * 2.5).bfloat16()
        params = [SamplingParams(temperature=0.8, top_p=0.95)] * rows
        u = torch.rand(rows, 2, generator=g)
        times = {"torch": [], "native": []}
        for _ in range(args.repeats):
            for path in times:
                sampling._native_first_draw = native_first_draw if path == "native" \
                    else (lambda *_: None)
                start = time.perf_counter()
                sampling._draw(logits, params, u)
                times[path].append(time.perf_counter() - start)
        sampling._native_first_draw = native_first_draw
        t, n = (statistics.median(times[k]) * 1e3 for k in ("torch", "native"))
        print(f"| {rows} | {t:.2f} | {n:.2f} | {t / n:.1f} |")


if __name__ == "__main__":
    main()
