"""Engine vs the one-request-at-a-time reference loop: output tokens/s and time to first token.

For each concurrency level (default 1, 8, 32, 64) the engine gets that many requests at
once (64-token prompts, 64 new tokens, greedy, EOS ignored) and steps until all finish;
TTFT is measured from submission to each request's first token. The reference loop
(fanformer.generate.generate) serves one request at a time whatever the concurrency, so its
tokens/s is measured on a few requests, and its TTFT at concurrency c is derived from the
measured per-request times: a request at queue position i waits i full requests, then its
own prefill (mean over i = 0..c-1). Everything runs in one process on the same random-weight
model, side by side; medians of --repeats runs. `--profile` adds a torch.profiler table of
engine steps at the largest concurrency (where the time goes).

    nice -n 10 .venv/bin/python bench/bench_engine.py --preset transformer-64m
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fanformer.config import ModelConfig
from fanformer.generate import generate
from fanformer.model import FANformer
from fanformer.tokenizer import Tokenizer
from server.cli import limit_malloc_arenas, reuse_freed_blocks
from server.engine import EngineConfig, LLMEngine
from server.sampling import SamplingParams

# fanformer-serve's allocator settings (server/cli.py), so that the in-process figures of
# this and the benches built on it (step_profile, native_step, single_row) are what the
# server runs with: without them each multi-MiB temporary can be a fresh mmap (the sampler
# of a 64-row sampled step then took about twice as long: docs/ENGINE.md "Memory allocator")
limit_malloc_arenas()
reuse_freed_blocks()

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def byte_tokenizer() -> Tokenizer:
    """The engine detokenizes: any small tokenizer works with random weights."""
    text = ["the quick brown fox jumps over the lazy dog " * 4]
    return Tokenizer.train(text, 300)


def build_model(preset: str, dtype: torch.dtype) -> FANformer:
    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset, dropout=0.0)
    return FANformer(config).to(dtype).eval()


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def start_decoding(engine: LLMEngine, rows: int, params: SamplingParams,
                   warmup: int = 3) -> None:
    """Submit `rows` random 64-token prompts, step until every one is decoding, then
    `warmup` steps more: where the step benchmarks start timing."""
    for i, p in enumerate(prompts(rows, 64, engine.model_config.vocab_size, 0)):
        engine.add_request(f"r{i}", p, params)
    while any(r.prefilling for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(warmup):
        engine.step()


def run_engine(engine: LLMEngine, batch: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start, cpu = time.perf_counter(), time.process_time()
    for i, p in enumerate(batch):
        engine.add_request(f"r{i}", p, params)
    first: dict[str, float] = {}
    tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.token_ids)
            first.setdefault(out.request_id, time.perf_counter() - start)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"tok_s": tokens / elapsed, "ttft": statistics.mean(first.values()),
            "tok_cpu_s": tokens / cpu}


def run_reference(model: FANformer, batch: list[list[int]], new_tokens: int) -> dict:
    """Per-request wall time and first-token time of the reference loop."""
    full, first, cpu = [], [], []
    for p in batch:
        t = time.perf_counter()
        generate(model, p, 1, temperature=0)
        first.append(time.perf_counter() - t)
        t, c = time.perf_counter(), time.process_time()
        out = generate(model, p, new_tokens, temperature=0)
        full.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        assert len(out) == new_tokens
    return {"request_s": statistics.median(full), "first_s": statistics.median(first),
            "request_cpu_s": statistics.median(cpu)}


def profile_engine(engine: LLMEngine, batch: list[list[int]], new_tokens: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(batch):
        engine.add_request(f"p{i}", p, params)
    while any(s.prefilling for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # profile decode steps only
    steps = 0
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        while engine.has_unfinished() and steps < 16:
            engine.step()
            steps += 1
    wall = (time.perf_counter() - t) / steps
    while engine.has_unfinished():
        engine.step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    return f"{steps} decode steps at batch {len(batch)}, {wall * 1e3:.1f} ms/step " \
           f"(with profiler overhead)\n{table}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="transformer-64m")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref_requests", type=int, default=3,
                   help="requests the reference loop runs (its speed does not depend on c)")
    p.add_argument("--max_num_batched_tokens", type=int, default=512)
    p.add_argument("--max_model_len", type=int, default=None,
                   help="the engine's context (KV cache length); default prompt + new tokens")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    if args.ref_requests < 1:
        p.error("--ref_requests must be >= 1: the table sets the engine against the reference loop")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    model = build_model(args.preset, dtype)
    tokenizer = byte_tokenizer()
    vocab = model.config.vocab_size
    top = max(args.concurrency)
    max_model_len = args.max_model_len or args.prompt_len + args.new_tokens
    config = EngineConfig(max_num_seqs=top, max_model_len=max_model_len,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          dtype=args.dtype)
    engine = LLMEngine(model, tokenizer, config)
    print(f"# {args.preset}: {model.num_parameters() / 1e6:.1f}M parameters, {args.dtype}, "
          f"{torch.get_num_threads()} threads, {engine.pool.describe()}")
    run_engine(engine, prompts(min(top, 8), args.prompt_len, vocab, 99), 4)  # warm-up
    with torch.inference_mode():
        ref = run_reference(model, prompts(args.ref_requests, args.prompt_len, vocab, 7),
                            args.new_tokens)
    ref_tok_s = args.new_tokens / ref["request_s"]
    ref_tok_cpu = args.new_tokens / ref["request_cpu_s"]
    print(f"reference loop: {ref['request_s']:.2f} s per request, first token "
          f"{ref['first_s'] * 1e3:.0f} ms -> {ref_tok_s:.1f} output tok/s at any concurrency")
    print("tok/s = output tokens per wall-clock second; tok/CPU-s = per second of this "
          "process's CPU time (less sensitive to other load on a shared machine)")
    print("| concurrent | engine tok/s | reference tok/s | ratio | engine tok/CPU-s "
          "| reference tok/CPU-s | engine TTFT ms | reference TTFT ms (derived) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in args.concurrency:
        runs = [run_engine(engine, prompts(c, args.prompt_len, vocab, 1000 * c + r),
                           args.new_tokens) for r in range(args.repeats)]
        tok_s = statistics.median(r["tok_s"] for r in runs)
        ttft = statistics.median(r["ttft"] for r in runs)
        tok_cpu = statistics.median(r["tok_cpu_s"] for r in runs)
        ref_ttft = ref["first_s"] + ref["request_s"] * (c - 1) / 2
        print(f"| {c} | {tok_s:.0f} | {ref_tok_s:.0f} | {tok_s / ref_tok_s:.1f}x "
              f"| {tok_cpu:.0f} | {ref_tok_cpu:.0f} | {ttft * 1e3:.0f} | {ref_ttft * 1e3:.0f} |",
              flush=True)
    if args.profile:
        print(profile_engine(engine, prompts(top, args.prompt_len, vocab, 5), args.new_tokens))


if __name__ == "__main__":
    main()
