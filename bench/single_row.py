"""Batch 1 with bf16 `F.linear` against `torch.mv` for one-row inputs (server/single_row.py).

    python bench/single_row.py --presets transformer-64m fanformer-92m tiny --rounds 3

For each preset (random weights, bf16) and each kernel, two figures at batch 1: the
model's linears alone on a one-row input (what bench/side_by_side.py calls the ceiling) and
a whole greedy engine decode step, timed alternately by `step_profile.profile`. The
kernels alternate --rounds times in one process, so their ratio, not the milliseconds, is
the result. Run it on an idle machine; the load average is
printed.
"""

from __future__ import annotations

import argparse
import os

import torch
from bench_engine import build_model  # bench/ is on sys.path when run as a script
from step_profile import profile
from torch import nn

import server.engine as engine_module
from server.cpu_linear import CPULinear, use_cpu_linears


def set_kernel(model: nn.Module, mv: bool) -> None:
    """mv: the engine's conversion (as it runs it); else plain nn.Linear, and the engines
    that `profile` builds are kept from converting the model back."""
    for m in model.modules():
        if type(m) is CPULinear:
            m.__class__ = nn.Linear
    engine_module.use_cpu_linears = use_cpu_linears if mv else (lambda *_: 0)
    if mv:
        use_cpu_linears(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["transformer-64m", "fanformer-92m", "tiny"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=24, help="decode steps timed per figure")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| preset | round | linears F.linear ms | linears torch.mv ms | ratio "
          "| step F.linear ms | step torch.mv ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        model = build_model(preset, torch.bfloat16)
        for r in range(args.rounds):
            linears, steps = {}, {}
            for mv in (False, True):
                set_kernel(model, mv)
                r = profile(model, 1, "greedy", args.steps)
                linears[mv], steps[mv] = r["linears_ms"], r["step_ms"]
            print(f"| {preset} | {r} | {linears[False]:.2f} | {linears[True]:.2f} "
                  f"| {linears[False] / linears[True]:.2f} | {steps[False]:.1f} "
                  f"| {steps[True]:.1f} | {steps[False] / steps[True]:.2f} |", flush=True)
    set_kernel(model, True)


if __name__ == "__main__":
    main()
