"""Chat traffic with a shared system prompt: prefix caching on / off / llama-server (issue 12).

    python bench/chat_prefix.py --rounds 2 --out docs/bench/chat_prefix-DATE.json

The workload (issue 12, "Measure"): --clients concurrent clients (64); every chat opens with
the same --system-len (400) token "system prompt" and a --user-len (50) token user turn of
its own, asks for --max-tokens (64) new tokens, EOS ignored, greedy, streaming, prompts sent
as token ids to /v1/completions. Two phases per arm, each with a system prompt of its own so
that neither finds the other's in a cache:
  * single: each client sends --chats (3) one-turn chats, one after another;
  * multi: each client holds one chat of --turns (3) turns; a turn resends the whole history
    (the previous prompt + the previous completion + a new user turn). The completion goes
    back as token ids: its text, tokenized by the server that wrote it (/tokenize), as a
    chat client's text would be.
Arms, each started fresh, warmed (one burst of --clients chats with a third system prompt)
and stopped, in an order that rotates by round: ours with prefix caching (the server's
defaults), ours without (`--no_prefix_caching`), and
llama-server with `--cache-prompt` and enough context for every slot's whole chat. Per phase:
TTFT p50/p99 (client side: request sent to first text), output tok/s (completion tokens /
the phase's wall time), the 1-minute load average before and after, and ours' prefix-cache
hit rate from /metrics.

Memory (--memory, on by default): the same KV budget as slots and as tokens. S
(--memory-slots) slots of max_model_len tokens take S x max_model_len x bytes per token;
ours runs once as `--max_num_seqs S` (today's slots) and once as `--kv_cache_gib <those
bytes> --max_num_seqs --memory-chats`, both with the same --max_model_len, and each gets
--memory-chats (256) short chats at once: unique --memory-prompt-len (50) token prompts (no
shared prefix, so caching cannot inflate the count), --max-tokens new tokens. /metrics is
polled every 20 ms; the figure is the most `vllm:num_requests_running` seen, with the median
while requests waited (the pool full) and the preemptions beside it, since a sequence
admitted and then preempted counts in the maximum. The client runs in this process, on the
same cores as the server. Writes JSON and a Markdown report beside it
(bench/chat_prefix_report.py); refuses an existing --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch
from chat_prefix_report import (  # bench/ is on sys.path when run as a script
    LLAMA,
    OURS_OFF,
    OURS_ON,
    PHASES,
    report_markdown,
    summarize,
)
from prometheus_client.parser import text_string_to_metric_families
from side_by_side import (
    ANCHOR_PRESET,
    GGUF,
    LLAMA_FLAGS,
    add_anchor_args,
    build_checkpoints,
    find_llama,
    machine,
    start_servers,
)

from fanformer.config import ModelConfig

ID_RANGE = (300, 30000)  # prompt ids, as the anchors' load.py draws them
RETOKENIZE_MARGIN = 64  # context kept per chat for a completion that tokenizes longer
POLL_S = 0.02


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds; arms' order rotates by round")
    p.add_argument("--clients", type=int, default=64, help="concurrent chat clients")
    p.add_argument("--system-len", "--system_len", type=int, default=400, dest="system_len",
                   help="shared system prompt, token ids")
    p.add_argument("--user-len", "--user_len", type=int, default=50, dest="user_len",
                   help="each user turn, token ids")
    p.add_argument("--max-tokens", "--max_tokens", type=int, default=64, dest="max_tokens")
    p.add_argument("--chats", type=int, default=3, help="one-turn chats per client (single)")
    p.add_argument("--turns", type=int, default=3, help="turns of the multi-turn chat")
    p.add_argument("--model", default=ANCHOR_PRESET,
                   help=f"preset with random weights; only {ANCHOR_PRESET} has an anchor")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure concurrent short chats per KV budget")
    p.add_argument("--memory-slots", "--memory_slots", type=int, default=8, dest="memory_slots",
                   help="S: the budget is S slots of max_model_len tokens")
    p.add_argument("--memory-chats", "--memory_chats", type=int, default=256,
                   dest="memory_chats", help="short chats sent at once (and --max_num_seqs)")
    p.add_argument("--memory-prompt-len", "--memory_prompt_len", type=int, default=50,
                   dest="memory_prompt_len", help="a short chat's prompt, token ids")
    p.add_argument("--seed", type=int, default=0, help="seeds every prompt's token ids")
    p.add_argument("--ours-flags", "--ours_flags", dest="ours_flags", default="",
                   help="extra fanformer-serve flags for both arms of ours, one string "
                        "(give it with '=': --ours-flags='--max_num_batched_tokens 2048'); "
                        "default: none, the server's defaults")
    add_anchor_args(p)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fanformer-bench",
                   help="built checkpoints and server logs")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON to write (default chat_prefix-<UTC time>.json); a .md beside it")
    args = p.parse_args(argv)
    for flag in ("rounds", "clients", "system_len", "user_len", "max_tokens", "chats", "turns",
                 "memory_slots", "memory_chats", "memory_prompt_len"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    config = ModelConfig.from_preset(args.model)  # unknown presets fail here, listing them
    need = chat_context(args)
    if need > config.max_seq_len:
        p.error(f"a {args.turns}-turn chat needs {need} tokens of context (with a "
                f"{RETOKENIZE_MARGIN}-token margin); {args.model} has {config.max_seq_len}")
    if args.memory_prompt_len + args.max_tokens > config.max_seq_len:
        p.error(f"--memory-prompt-len + --max-tokens exceed {args.model}'s "
                f"{config.max_seq_len}-token context")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    args.out = args.out or Path(f"chat_prefix-{stamp}.json")
    if args.out.suffix == ".md":
        p.error(f"--out {args.out} ends in .md; name the JSON (the .md is written beside it)")
    if args.out.exists() or args.out.with_suffix(".md").exists():
        p.error(f"{args.out} (or its .md) exists; pass another --out")
    return args


# ---- the workload (pure) ----
def id_range(vocab_size: int) -> tuple[int, int]:
    """Prompt ids: the anchors' range, cut to the vocabulary of small presets."""
    low, high = ID_RANGE
    return (min(low, vocab_size // 4), min(high, vocab_size))


def random_ids(seed: tuple, n: int, ids: tuple[int, int]) -> list[int]:
    rng = random.Random(repr(seed))  # str seeds hash stably across runs
    return [rng.randrange(*ids) for _ in range(n)]


def system_prompt(run_seed: int, rnd: int, phase: str, n: int, ids) -> list[int]:
    """The prompt every chat of one phase of one round opens with; phases and rounds (and
    the warm-up, phase "warmup") each get their own, so none finds another's in a cache."""
    return random_ids(("system", run_seed, rnd, phase), n, ids)


def user_turn(run_seed: int, rnd: int, phase: str, client: int, chat: int, turn: int,
              n: int, ids) -> list[int]:
    return random_ids(("user", run_seed, rnd, phase, client, chat, turn), n, ids)


def next_prompt(prompt: list[int], completion: list[int], user: list[int]) -> list[int]:
    """A chat's next turn resends its whole history: the last prompt, the reply, a new turn."""
    return [*prompt, *completion, *user]


def chat_context(args) -> int:
    """Tokens one chat may reach: the system prompt, every turn and reply, a margin for a
    reply that tokenizes longer than it was generated."""
    return args.system_len + args.turns * (args.user_len + args.max_tokens) + RETOKENIZE_MARGIN


def llama_flags(clients: int, per_slot: int) -> list[str]:
    """The anchors' documented flags with the prompt cache on and `clients` slots of
    `per_slot` tokens (rounded up to 256) instead of 64 x 144 with the cache off."""
    per_slot = -(-per_slot // 256) * 256
    flags = [f for f in LLAMA_FLAGS if f != "--no-cache-prompt"] + ["--cache-prompt"]
    flags[flags.index("-np") + 1] = str(clients)
    flags[flags.index("-c") + 1] = str(clients * per_slot)
    return flags


def slots_budget_gib(slots: int, max_model_len: int, bytes_per_token: int) -> float:
    """GiB that `slots` KV slots of `max_model_len` tokens take: the paged arm's budget."""
    return slots * max_model_len * bytes_per_token / 2**30


# ---- the client ----
async def stream_completion(client: httpx.AsyncClient, url: str, prompt: list[int],
                            max_tokens: int) -> dict:
    """One streamed completion: TTFT (to the first chunk with text), its text and usage."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
            "min_tokens": max_tokens}
    rec = {"prompt_tokens": len(prompt), "ttft_s": None, "completion_tokens": 0, "error": None}
    text, chunks = [], 0
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                j = json.loads(line[5:])
                if j.get("usage"):
                    rec["completion_tokens"] = j["usage"]["completion_tokens"]
                for choice in j.get("choices") or []:
                    if choice.get("text"):
                        chunks += 1
                        text.append(choice["text"])
                        if rec["ttft_s"] is None:
                            rec["ttft_s"] = time.perf_counter() - t0
        rec["completion_tokens"] = rec["completion_tokens"] or chunks
        if rec["ttft_s"] is None:
            raise RuntimeError("stream ended without any text")
    except Exception as e:  # counted and reported, never fatal
        rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    rec["latency_s"] = time.perf_counter() - t0
    rec["text"] = "".join(text)
    return rec


async def tokenize(client: httpx.AsyncClient, url: str, kind: str, text: str) -> list[int]:
    """The server's own token ids for `text` (ours: vLLM's /tokenize; llama-server's)."""
    body = {"content": text} if kind == LLAMA else {"prompt": text}
    r = await client.post(url + "/tokenize", json=body)
    r.raise_for_status()
    return r.json()["tokens"]


async def run_phase(url: str, kind: str, phase: str, rnd: int, args, ids) -> dict:
    """Every client's chats of one phase, all clients at once; per-request records."""
    chats, turns = {"single": (args.chats, 1), "multi": (1, args.turns)}.get(phase, (1, 1))
    max_tokens = args.max_tokens if phase != "warmup" else min(args.max_tokens, 16)
    system = system_prompt(args.seed, rnd, phase, args.system_len, ids)
    records: list[dict] = []

    async def one_client(client, c):
        for chat in range(chats):
            prompt = system + user_turn(args.seed, rnd, phase, c, chat, 0, args.user_len, ids)
            for turn in range(turns):
                rec = await stream_completion(client, url, prompt, max_tokens)
                entry = {**rec, "client": c, "chat": chat, "turn": turn}
                records.append(entry)
                if rec["error"] or turn + 1 == turns:
                    break  # a failed turn ends its chat: there is no history to resend
                try:
                    reply = await tokenize(client, url, kind, entry.pop("text"))
                except httpx.HTTPError as e:  # counted on the turn, never fatal
                    entry["error"] = f"tokenize: {type(e).__name__}: {str(e)[:200]}"
                    break
                prompt = next_prompt(prompt, reply, user_turn(
                    args.seed, rnd, phase, c, chat, turn + 1, args.user_len, ids))

    # No keep-alive: llama-server's HTTP library closes idle and long-used connections on
    # its own, and a request sent on one as it closes fails ("disconnected without sending
    # a response"). A connection per request costs both servers the same.
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(900, connect=10)) as cl:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(cl, c) for c in range(args.clients)))
        wall = time.perf_counter() - t0
    for rec in records:
        rec.pop("text", None)
    return {"wall_s": wall, "records": records}


# ---- /metrics ----
def scrape(url: str, timeout: float = 10) -> dict[str, float]:
    """Every sample of the server's /metrics summed by name ({} where it has none)."""
    try:
        r = httpx.get(url + "/metrics", timeout=timeout)
    except httpx.HTTPError:
        return {}
    return parse_metrics(r.text) if r.status_code == 200 else {}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: every sample's value summed over its labels, by sample name."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def counter(sample: dict[str, float], name: str) -> float | None:
    """A counter's value whether its samples carry prometheus-client's `_total` or not."""
    return sample.get(name + "_total", sample.get(name))


async def poll_running(url: str, stop: asyncio.Event) -> list[tuple[float, float]]:
    """(running, waiting) samples from /metrics every POLL_S seconds until `stop`."""
    samples = []
    async with httpx.AsyncClient(timeout=10) as client:
        while not stop.is_set():
            try:
                r = await client.get(url + "/metrics")
            except httpx.HTTPError:  # a missed sample, not a failed run
                await asyncio.sleep(POLL_S)
                continue
            m = parse_metrics(r.text)
            samples.append((m.get("vllm:num_requests_running", 0.0),
                            m.get("vllm:num_requests_waiting", 0.0)))
            await asyncio.sleep(POLL_S)
    return samples


async def memory_load(url: str, args, ids, rnd: int) -> dict:
    """--memory-chats unique short chats at once, /metrics polled all along."""
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_running(url, stop))
    limits = httpx.Limits(max_connections=args.memory_chats + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(1800, connect=10)) as cl:
        recs = await asyncio.gather(*(stream_completion(
            cl, url, random_ids(("memory", args.seed, rnd, i), args.memory_prompt_len, ids),
            args.max_tokens) for i in range(args.memory_chats)))
    stop.set()
    samples = await poller
    return {"samples": len(samples), "max_running": max((r for r, _ in samples), default=0),
            "median_running_while_waiting": statistics.median(
                [r for r, w in samples if w > 0] or [0]),
            "failed": sum(1 for r in recs if r["error"]),
            "short_outputs": sum(1 for r in recs if not r["error"]
                                 and r["completion_tokens"] < args.max_tokens),
            "errors": sorted({r["error"] for r in recs if r["error"]})[:5]}


# ---- the run ----
def ours_argv(checkpoint: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "--checkpoint", str(checkpoint),
            "--served_model_name", "bench", *flags]


def measure_arm(name: str, argv: list[str], rnd: int, args, ids, logdir: Path) -> list[dict]:
    """Start one arm fresh, warm it, measure both phases, stop it."""
    points = []
    with ExitStack() as stack:
        (server,) = start_servers([(name, argv)], logdir, stack)
        asyncio.run(run_phase(server.url, name, "warmup", rnd, args, ids))
        for phase in PHASES:
            before, load0 = scrape(server.url), os.getloadavg()
            cpu0, client0 = server.cpu_seconds(), time.process_time()
            r = asyncio.run(run_phase(server.url, name, phase, rnd, args, ids))
            load1, after = os.getloadavg(), scrape(server.url)
            hits = {k: None if counter(before, k) is None or counter(after, k) is None
                    else counter(after, k) - counter(before, k)
                    for k in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits")}
            points.append({"round": rnd, "arm": name, "phase": phase, "wall_s": r["wall_s"],
                           "records": r["records"], "prefix_cache_queries":
                           hits["vllm:prefix_cache_queries"], "prefix_cache_hits":
                           hits["vllm:prefix_cache_hits"],
                           "loadavg_before": [round(x, 2) for x in load0],
                           "loadavg_after": [round(x, 2) for x in load1],
                           "server_cpu_s": round(server.cpu_seconds() - cpu0, 2),
                           "client_cpu_s": round(time.process_time() - client0, 2)})
            ok = [x for x in r["records"] if not x["error"]]
            ttft = sorted(x["ttft_s"] for x in ok)
            print(f"  round {rnd} {phase:<6} {name:<17} "
                  f"{sum(x['completion_tokens'] for x in ok) / r['wall_s']:7.1f} tok/s  TTFT "
                  f"p50 {1e3 * ttft[len(ttft) // 2] if ttft else float('nan'):.0f} ms  "
                  f"failed {len(r['records']) - len(ok)}  load {load0[0]:.2f}->{load1[0]:.2f}",
                  flush=True)
    return points


def measure_memory(checkpoint: Path, config: ModelConfig, rnd: int, args, ids,
                   logdir: Path) -> list[dict]:
    """The same KV budget as S slots and as a token pool; most concurrent short chats each."""
    from server.kv_cache import KVCachePool  # the engine's own bytes per token

    per_token = KVCachePool.bytes_per_token(config, torch.bfloat16)
    gib = slots_budget_gib(args.memory_slots, config.max_seq_len, per_token)
    common = ["--max_model_len", str(config.max_seq_len)]
    # the budget goes as repr(): exactly S slots' bytes, so a slots engine fits S, not S - 1
    arms = [("slots", ["--max_num_seqs", str(args.memory_slots), *common]),
            ("token budget", ["--kv_cache_gib", repr(gib), "--max_num_seqs",
                              str(args.memory_chats), *common])]
    if rnd % 2:
        arms.reverse()
    points = []
    for name, flags in arms:
        with ExitStack() as stack:
            (server,) = start_servers([(f"ours {name}", ours_argv(checkpoint, *flags))],
                                      logdir, stack)
            load0, before = os.getloadavg(), scrape(server.url)
            r = asyncio.run(memory_load(server.url, args, ids, rnd))
            load1, after = os.getloadavg(), scrape(server.url)
            pre = [counter(x, "vllm:num_preemptions") for x in (before, after)]
            points.append({"round": rnd, "arm": name, "flags": flags, "kv_cache_gib": gib,
                           "preemptions": None if None in pre else pre[1] - pre[0],
                           "loadavg_before": [round(x, 2) for x in load0],
                           "loadavg_after": [round(x, 2) for x in load1], **r})
            print(f"  round {rnd} memory {name:<13} max running {r['max_running']:.0f}  "
                  f"median while waiting {r['median_running_while_waiting']:.0f}  "
                  f"failed {r['failed']}  load {load0[0]:.2f}->{load1[0]:.2f}", flush=True)
    return points


def run(args) -> dict:
    config = ModelConfig.from_preset(args.model)
    ids = id_range(config.vocab_size)
    llama, skipped = find_llama(args) if args.model == ANCHOR_PRESET else \
        (None, f"no anchor serves {args.model}")
    if skipped:
        print(f"llama-server arm skipped: {skipped}", flush=True)
    checkpoint = build_checkpoints(args.model, args.cache, variants=("bf16",))["bf16"]
    extra = shlex.split(args.ours_flags)
    specs = {OURS_ON: ours_argv(checkpoint, *extra),
             OURS_OFF: ours_argv(checkpoint, *extra, "--no_prefix_caching")}
    flags = llama_flags(args.clients, chat_context(args))
    if llama:
        specs[LLAMA] = [str(llama), "-m", str(args.anchors_work / "gguf" / GGUF["bf16"]),
                        "--host", "127.0.0.1", *flags]
    logdir = args.cache / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    points, memory = [], []
    for rnd in range(args.rounds):
        order = list(specs)
        order = order[rnd % len(order):] + order[:rnd % len(order)]  # rotate by round
        for name in order:
            points += measure_arm(name, specs[name], rnd, args, ids, logdir)
        if args.memory:
            memory += measure_memory(checkpoint, config, rnd, args, ids, logdir)
    return {"points": points, "memory": memory, "servers": {k: v[1:] for k, v in specs.items()},
            "prefix_caching_flag": True, "llama_skipped": skipped or None,
            "llama_server": None if llama is None else {"path": str(llama), "flags": flags,
                                                        "version": subprocess.run(
                [llama, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True).stdout.strip()}}


def main(argv=None) -> int:
    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "started_utc": started.isoformat(timespec="seconds"), "machine": machine(),
              "protocol": {k: getattr(args, k) for k in (
                  "model", "clients", "system_len", "user_len", "max_tokens", "chats", "turns",
                  "rounds", "seed", "memory", "memory_slots", "memory_chats", "memory_prompt_len")}}
    result.update(run(args))
    result["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["summary"] = summarize(result)
    markdown = report_markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "x") as f:  # "x": never replace a file this run did not write
        f.write(json.dumps(result, indent=1) + "\n")
    with open(args.out.with_suffix(".md"), "x") as f:
        f.write(markdown)
    print("\n" + markdown)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
