"""The native decode step against the eager model, in one engine, alternating.

For each row count, `rows` requests (64-token prompts, greedy, EOS ignored) are prefilled,
then decode steps run in alternating groups of `--group` steps with the engine's native
step on and off (`engine.native_step` set to None; with `--against phased`, set to the
phased native step instead), so both see the same contexts, the
same process and the same machine noise. Prints the median step time of each, their
ratio, and the median time of the native step's own call (embedding, the C blocks, final
norm) inside the "on" steps. Use a quantized checkpoint for the fused step, a bf16 one for
the phased step (server/native_step.py). Run it on an idle machine; compare figures of one
run only.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/native_step.py --checkpoint CKPT \\
        --rows 1 4 16 32 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from bench_engine import build_model, start_decoding

from quant.convert import load_any_checkpoint
from server.engine import EngineConfig, LLMEngine
from server.native_step import NativeDecodeStep
from server.sampling import SamplingParams


class TimedStep:
    """The engine's native step, its calls timed (the engine asks only these three)."""

    def __init__(self, step):
        self.step, self.times = step, []

    def takes(self, segments, block_size: int) -> bool:
        return self.step.takes(segments, block_size)

    def logits(self, h):
        return self.step.logits(h)

    def __call__(self, *args):
        start = time.perf_counter()
        try:
            return self.step(*args)
        finally:
            self.times.append(time.perf_counter() - start)


def measure(model, tokenizer, rows: int, groups: int, group: int, beyond: bool,
            against: str = "eager") -> dict:
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=max(rows, 1),
                                                      dtype="bfloat16"))
    native = engine.native_step
    if native is None:
        raise SystemExit("native_step: the engine built no native step here (see its log)")
    takes_it = rows <= native.max_rows  # the prompts share no prefix
    if beyond:  # what the step would do at this count
        native.max_rows = max(native.max_rows, rows)
        native.fused_max_rows = rows if native.fused else 0
    other = None
    if against == "phased":  # the phased way at every count, the other side of each pair
        other = NativeDecodeStep(model, engine.pool, native.lib, fused=False)
        other.max_rows = max(other.max_rows, rows)
    params = SamplingParams(max_tokens=groups * group + 16, ignore_eos=True, temperature=0)
    start_decoding(engine, rows, params, warmup=4)
    timed = TimedStep(native)
    times: dict[bool, list[float]] = {True: [], False: []}
    for k in range(groups):
        on = k % 2 == 0
        engine.native_step = timed if on else other
        for _ in range(group):
            start = time.perf_counter()
            engine.step()
            times[on].append(time.perf_counter() - start)
    ms = {on: statistics.median(t) * 1e3 for on, t in times.items()}
    call = statistics.median(timed.times) * 1e3 if timed.times else float("nan")
    return {"native_ms": ms[True], "eager_ms": ms[False], "call_ms": call,
            "way": "fused" if native.fused and rows <= native.fused_max_rows else "phased",
            "takes_it": takes_it}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="a plain or quantized checkpoint")
    p.add_argument("--preset", default="transformer-64m",
                   help="random bf16 weights of this preset when no --checkpoint")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    p.add_argument("--groups", type=int, default=16, help="alternating groups (even)")
    p.add_argument("--group", type=int, default=8, help="decode steps per group")
    p.add_argument("--beyond", action="store_true",
                   help="lift the step's row bounds: measure it (fused, where it can be) where "
                        "the engine would not take it (that way)")
    p.add_argument("--against", choices=["eager", "phased"], default="eager",
                   help="what the other side of each pair runs: the eager model, or the phased "
                        "native step (for a model whose step is fused)")
    args = p.parse_args()
    if args.checkpoint:
        model, tokenizer = load_any_checkpoint(args.checkpoint, dtype=torch.bfloat16)
    else:
        from bench_engine import byte_tokenizer
        model, tokenizer = build_model(args.preset, torch.bfloat16), byte_tokenizer()
    print(f"# {args.checkpoint or args.preset}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| rows | way | taken at this count | native step ms | of which its call ms "
          f"| {args.against} step ms | {args.against} / native |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for rows in args.rows:
        r = measure(model.eval(), tokenizer, rows, args.groups, args.group, args.beyond,
                    args.against)
        print(f"| {rows} | {r['way']} | {'yes' if r['takes_it'] else 'no'} "
              f"| {r['native_ms']:.2f} | {r['call_ms']:.2f} | {r['eager_ms']:.2f} "
              f"| {r['eager_ms'] / r['native_ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
