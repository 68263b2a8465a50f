"""HTTP serving throughput: the load generator through fanformer-serve vs the engine alone.

    nice -n 10 python bench/bench_http.py --models demo fanformer-92m transformer-64m

For each model, side by side in one run on the same machine: (1) the engine alone, driven
in-process through `AsyncEngine.generate` by C concurrent callers; (2) the same checkpoint
behind `fanformer-serve` in a subprocess, driven by clients/loadgen.py with C concurrent
streaming clients. Both send the same 64-token prompt (token ids), greedy, `ignore_eos`, 64
new tokens, so the difference is the HTTP layer (JSON, SSE, sockets, and the load
generator's own CPU: it shares the machine). Random-weight models get a tokenizer (the
demo's, else one trained on the held-out text) and the embedding rows zeroed of every token
that is not whole UTF-8 text on its own (tied head: those logits are exactly 0, so greedy
decoding never picks them and every generated token streams as one chunk of text). Prints a
Markdown table and writes JSON. Knows nothing about the engine's internals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "clients"))
import loadgen  # noqa: E402

from fanformer.checkpoint import DEMO_CHECKPOINT, load_tokenizer, save_checkpoint  # noqa: E402
from fanformer.config import ModelConfig  # noqa: E402
from fanformer.model import FANformer  # noqa: E402
from fanformer.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EVAL_TEXT = ROOT / "fanformer" / "assets" / "eval.txt"


def checkpoint_for(name: str, workdir: Path) -> Path:
    if name == "demo":
        if not (DEMO_CHECKPOINT / "config.json").is_file():
            raise SystemExit(f"the demo model is not built yet ({DEMO_CHECKPOINT})")
        return DEMO_CHECKPOINT
    if (DEMO_CHECKPOINT / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(DEMO_CHECKPOINT)
    else:
        tokenizer = Tokenizer.train_from_files([EVAL_TEXT], 8192, show_progress=False)
    config = ModelConfig.from_preset(name, dropout=0.0)
    torch.manual_seed(0)
    model = FANformer(config).eval()
    with torch.no_grad():  # only tokens that are whole UTF-8 text can win the argmax
        model.embed.weight[[i for i in range(config.padded_vocab_size)
                            if not is_whole_text(tokenizer, i)]] = 0
    return save_checkpoint(workdir / name, model, tokenizer)


def is_whole_text(tokenizer: Tokenizer, token_id: int) -> bool:
    if token_id >= tokenizer.vocab_size or token_id in tokenizer.special_ids:
        return False
    text = tokenizer.decode([token_id])
    return bool(text) and "\ufffd" not in text


def prompt_ids(checkpoint: Path, n: int) -> list[int]:
    tokenizer = load_tokenizer(checkpoint)
    ids = tokenizer.encode(EVAL_TEXT.read_text()[:20_000])
    return ids[1000:1000 + n]


def requests_at(c: int) -> int:
    return max(4, 2 * c)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(process: psutil.Process, loop_thread: int | None = None) -> tuple[float, float]:
    """CPU seconds of a process's event-loop thread (its main thread: for the server that is
    HTTP, JSON, SSE and the async engine front) and of the whole process (plus the engine's
    step thread and torch's workers). Unlike wall time, CPU time hardly depends on who else
    uses the machine."""
    loop_thread = loop_thread or process.pid
    loop = next(t for t in process.threads() if t.id == loop_thread)
    total = process.cpu_times()
    return loop.user_time + loop.system_time, total.user + total.system


async def engine_level(engine, params, ids: list[int], c: int) -> dict:
    """C concurrent callers of AsyncEngine.generate, requests_at(c) requests in all."""
    async def one() -> tuple[float, int]:
        start, ttft, tokens = time.perf_counter(), None, 0
        async for out in engine.generate(ids, params):
            if out.token_ids and ttft is None:
                ttft = time.perf_counter() - start
            tokens = out.num_generated_tokens
        return ttft, tokens

    todo = iter(range(requests_at(c)))
    results = []

    async def worker():
        for _ in todo:
            results.append(await one())
    me = psutil.Process()
    loop0, _ = cpu_seconds(me, threading.main_thread().native_id)
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(c)))
    wall = time.perf_counter() - start
    loop1, _ = cpu_seconds(me, threading.main_thread().native_id)
    ttfts = [t for t, _ in results]
    tokens = sum(n for _, n in results)
    return {"output_tokens_per_s": round(tokens / wall, 1),
            "loop_cpu_us_per_token": round((loop1 - loop0) / max(tokens, 1) * 1e6, 1),
            "ttft_ms": {"p50": round(loadgen.percentile(ttfts, 50) * 1000, 1),
                        "p99": round(loadgen.percentile(ttfts, 99) * 1000, 1)}}


async def http_level(url: str, process: psutil.Process, args, ids: list[int], c: int) -> dict:
    la = loadgen.build_parser().parse_args([
        "--url", url + "/v1", "--concurrency", str(c), "--num_requests", str(requests_at(c)),
        "--max_tokens", str(args.max_tokens), "--ignore_eos", "--prompt_ids",
        ",".join(map(str, ids)), "--same_prompt", "--warmup", "1", "--model", "bench"])
    me = psutil.Process()
    loop0, all0 = cpu_seconds(process)
    client0 = sum(me.cpu_times()[:2])
    report = await loadgen.run(la)
    loop1, all1 = cpu_seconds(process)
    client1 = sum(me.cpu_times()[:2])
    tokens = max(report["output_tokens"], 1)
    report["client_cpu_us_per_token"] = round((client1 - client0) / tokens * 1e6, 1)
    report["server_loop_cpu_us_per_token"] = round((loop1 - loop0) / tokens * 1e6, 1)
    report["server_cpu_us_per_token"] = round((all1 - all0) / tokens * 1e6, 1)
    report["loop_cpu_share"] = round((loop1 - loop0) / max(all1 - all0, 1e-9), 3)
    return report


async def bench_model(checkpoint: Path, args, ids: list[int]) -> tuple[dict, dict]:
    """The engine in-process and the server in a subprocess, both up at once and idle in
    turn, measured level by level in alternation so that drift in the machine's load hits
    both alike."""
    from server.async_engine import AsyncEngine
    from server.cli import load
    from server.engine import EngineConfig, LLMEngine
    from server.sampling import SamplingParams

    model, tokenizer, _ = load(str(checkpoint), args.device, args.dtype)
    engine = AsyncEngine(LLMEngine(model, tokenizer, EngineConfig(
        max_num_seqs=max(args.concurrency), device=args.device, dtype=args.dtype)))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--checkpoint", str(checkpoint), "--port",
         str(port), "--device", args.device, "--dtype", args.dtype, "--max_num_seqs",
         str(max(args.concurrency)), "--log_level", "warning", "--served_model_name", "bench"],
        cwd=ROOT, env={**os.environ, **({"OMP_NUM_THREADS": str(args.threads)}
                                         if args.threads else {})})
    url = f"http://127.0.0.1:{port}"
    await engine.start()
    try:
        await engine_level(engine, params, ids, 1)  # warm-up
        deadline = time.monotonic() + 300
        async with httpx.AsyncClient() as http:
            while True:
                try:
                    if (await http.get(url + "/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("fanformer-serve did not come up")
                await asyncio.sleep(0.5)
        process = psutil.Process(server.pid)
        alone, through = {}, {}
        for c in args.concurrency:
            rounds = []
            for _ in range(args.rounds):  # alternate, so drift in the load hits both alike
                rounds.append((await engine_level(engine, params, ids, c),
                               await http_level(url, process, args, ids, c)))
                print(f"  {c} clients: engine {rounds[-1][0]['output_tokens_per_s']} tok/s, "
                      f"HTTP {rounds[-1][1]['output_tokens_per_s']} tok/s", flush=True)
            # the round with the median HTTP/engine ratio stands for the level
            rounds.sort(key=lambda r: r[1]["output_tokens_per_s"] / r[0]["output_tokens_per_s"])
            alone[c], through[c] = rounds[len(rounds) // 2]
            through[c]["ratios"] = [round(h["output_tokens_per_s"] / e["output_tokens_per_s"], 3)
                                    for e, h in rounds]
        return alone, through
    finally:
        await engine.shutdown()
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["demo", "fanformer-92m", "transformer-64m"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1,
                   help="engine/HTTP alternations per level; the median-ratio round is shown")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the engine, in both the bench and the server "
                        "(default: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default="bench_http.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, report = [], {"args": vars(args), "cpus": os.cpu_count(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            checkpoint = checkpoint_for(name, Path(tmp))
            ids = prompt_ids(checkpoint, args.prompt_tokens)
            print(name, flush=True)
            alone, http = asyncio.run(bench_model(checkpoint, args, ids))
            report["models"][name] = {"engine": alone, "http": http}
            for c in args.concurrency:
                e, h = alone[c], http[c]
                ratio = h["output_tokens_per_s"] / e["output_tokens_per_s"]
                rows.append(f"| {name} | {c} | {e['output_tokens_per_s']} | "
                            f"{h['output_tokens_per_s']} | {ratio:.2f} | "
                            f"{e['ttft_ms']['p50']} / {e['ttft_ms']['p99']} | "
                            f"{h['ttft_ms']['p50']} / {h['ttft_ms']['p99']} | "
                            f"{h['itl_ms']['p50']} / {h['itl_ms']['p99']} | "
                            f"{e['loop_cpu_us_per_token']} / "
                            f"{h['server_loop_cpu_us_per_token']} | "
                            f"{h['server_cpu_us_per_token']} "
                            f"({100 * h['loop_cpu_share']:.1f}%) | "
                            f"{h['client_cpu_us_per_token']} | {h['errors']} |")
                print(rows[-1], flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("\n| model | clients | engine tok/s | HTTP tok/s | HTTP / engine | engine TTFT p50 / "
          "p99 ms | HTTP TTFT p50 / p99 ms | HTTP ITL p50 / p99 ms | event-loop CPU µs/token, "
          "engine alone / server | server CPU µs/token (event-loop share) | load generator "
          "CPU µs/token | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
