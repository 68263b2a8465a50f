"""Decode steps against steps that also carry a new prompt's prefill (what a serving engine
runs whenever a request arrives): R requests decode, and every fourth step a prompt of
--prompt_len tokens is added, so that step runs the decode rows and the prompt together
(the native step, each token a row, up to its mixed bound; the eager model above it or
with FANFORMER_NATIVE_STEP=0).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/mixed_step.py --checkpoint CKPT --rows 16 64

Prints the median ms of each kind of step per row count (and with --profile a torch profile
of a few mixed steps). In-process, the server's allocator settings (bench_engine); run it
on an idle machine and compare figures of one run only.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
from bench_engine import start_decoding

from quant import load_any_checkpoint
from server.engine import EngineConfig, LLMEngine
from server.sampling import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a plain or quantized checkpoint")
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--prompts", type=int, default=1,
                   help="prompts arriving together (8 x 64 tokens: the default step budget)")
    p.add_argument("--steps", type=int, default=12, help="mixed steps per row count")
    p.add_argument("--profile", action="store_true", help="torch profile of mixed steps")
    args = p.parse_args()
    model, tokenizer = load_any_checkpoint(args.checkpoint, "cpu", torch.bfloat16)
    rng = random.Random(0)
    one_token = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0)

    def add_prompt(engine: LLMEngine, name: str) -> None:
        for i in range(args.prompts):
            engine.add_request(f"{name}-{i}",
                               [rng.randrange(300, 30000) for _ in range(args.prompt_len)],
                               one_token)

    print(f"# {args.checkpoint}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"| decode rows | decode step ms | step with {args.prompts} x {args.prompt_len}-token "
          "prefill ms |")
    print("|---:|---:|---:|")
    for rows in args.rows:
        engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=rows + args.prompts + 8,
                                                          dtype="bfloat16"))
        start_decoding(engine, rows, SamplingParams(max_tokens=8 * args.steps + 64,
                                                    ignore_eos=True, temperature=0), warmup=4)
        decode, mixed = [], []
        for k in range(args.steps):
            for _ in range(3):
                start = time.perf_counter()
                engine.step()
                decode.append(time.perf_counter() - start)
            add_prompt(engine, f"prompt-{k}")
            start = time.perf_counter()
            engine.step()
            mixed.append(time.perf_counter() - start)
        print(f"| {rows} | {statistics.median(decode) * 1e3:.1f} "
              f"| {statistics.median(mixed) * 1e3:.1f} |", flush=True)
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                for k in range(6):
                    add_prompt(engine, f"profiled-{k}")
                    engine.step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
