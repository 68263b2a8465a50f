"""fanformer-serve against llama.cpp's llama-server, alternately in one run (issue 11, part 6).

    python bench/side_by_side.py --rounds 2 --streams 1 16 64 \
        --out docs/bench/side_by_side-DATE.json

The only speed figures the docs quote are ratios measured here, in one run on one machine:
absolute tokens/s drift between runs (load, clocks), ratios taken minutes apart drift less.
Protocol (the issue's): both servers at their defaults (ours `--max_num_seqs 64`; llama-server
with the anchor's documented flags), 64-token prompts sent as token ids, 64 new tokens, EOS
ignored, streaming, greedy and sampled (temperature 0.8, top_p 0.95), 1 / 16 / 64 streams;
bf16 against f16 and our rtn 4-bit g128 (int8 LM head) against q4_0, all on the 63.6M
Llama shape (`transformer-64m`, random weights); plus the linear-only ceiling, right before
and right after each of our bf16 1-stream points: the time of just one decode step's
nn.Linear matmuls at batch 1 in bf16 (through the engine's one-row kernel,
server/cpu_linear.py), in this process, on the same checkpoint and on the thread count the
engine uses for a 1-token step; the stream is judged against the mean of the two.

Each round and pair starts both servers fresh, warms both at the largest stream count, then
measures every point on one and then the other (which goes first alternates by round); the
idle one's CPU use during the other's load is recorded to show it stayed idle. The same load
generator drives both: the anchor's `load.py` (run by path; clients/loadgen.py where the
anchors are absent, our server alone). It shares the machine's cores with the servers.
fanformer-92m (in --models by default) gets our figures alone: no anchor serves it.
Checkpoints are built into --cache, keyed on a hash of the code that writes them: random
weights, a byte-level BPE trained on random lowercase words so that nearly every id is whole
text (as in the anchor's synthetic vocab), and the 4-bit one by `fanformer-quantize --method
rtn`. Writes JSON and a Markdown file beside it and prints the table
(bench/side_by_side_report.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil
import torch
from bench_http import free_port, is_whole_text  # bench/ is on sys.path when run as a script
from side_by_side_report import OURS, report_markdown, summarize

from fanformer.checkpoint import is_quantized, load_checkpoint, save_checkpoint
from fanformer.config import ModelConfig
from fanformer.model import FANformer
from fanformer.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "v1"  # bump when build_checkpoints' recipe changes: the cache keys on it
MODES = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.8, "top_p": 0.95}}
VARIANTS = ("bf16", "4bit")
GGUF = {"bf16": "f16.gguf", "4bit": "q4_0.gguf"}  # the anchor each of ours is compared with
ANCHOR_PRESET = "transformer-64m"  # the anchor serves this shape only
# the anchor's documented command line (../shared/anchors/README.md): 64 slots of 144 tokens
LLAMA_FLAGS = ["-t", "2", "-tb", "2", "-np", "64", "-c", "9216", "-cb", "--no-cache-prompt"]
QUANTIZE = ["--method", "rtn", "--bits", "4", "--group_size", "128", "--lm_head", "int8"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (medians over them)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64],
                   help="concurrent streaming clients per point")
    p.add_argument("-n", "--requests", type=int, default=None,
                   help="requests per point (default: 8 at 1 stream, else 3 x streams)")
    p.add_argument("--max-tokens", "--max_tokens", type=int, default=64, dest="max_tokens")
    p.add_argument("--prompt-len", "--prompt_len", type=int, default=64, dest="prompt_len",
                   help="prompt length in token ids")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--models", nargs="+", default=[ANCHOR_PRESET, "fanformer-92m"],
                   help=f"presets with random weights; only {ANCHOR_PRESET} has an anchor")
    add_anchor_args(p)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fanformer-bench",
                   help="built checkpoints and server logs")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON to write (default side_by_side-<UTC time>.json); a .md beside it")
    args = p.parse_args(argv)
    for flag in ("rounds", "prompt_len", "max_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if min(args.streams) < 1 or (args.requests is not None and args.requests < 1):
        p.error("--streams and --requests must be at least 1")
    for name in args.models:
        ModelConfig.from_preset(name)  # unknown presets fail here, listing the valid ones
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    args.out = args.out or Path(f"side_by_side-{stamp}.json")
    if args.out.suffix == ".md":  # the report goes to its .md: it would replace the JSON
        p.error(f"--out {args.out} ends in .md; name the JSON (the .md is written beside it)")
    if args.out.exists() or args.out.with_suffix(".md").exists():
        p.error(f"{args.out} (or its .md) exists; pass another --out")
    return args


def requests_for(streams: int, args) -> int:
    return args.requests or (8 if streams == 1 else 3 * streams)


# ---- checkpoints ----
def words_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE of exactly `vocab_size` ids, trained on random lowercase words: every
    id but the 128 non-ASCII bytes and the specials decodes to whole text, so sampled tokens
    stream as text chunks on our side as on the anchor's (whose vocab is 3-letter pieces)."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 5))) for _ in range(20 * vocab_size)]
    return Tokenizer.train([" ".join(words[i:i + 64]) for i in range(0, len(words), 64)],
                           vocab_size)


def code_key(*patterns: str) -> str:
    """A short hash of the source files that write a checkpoint: a cached checkpoint is
    reused only while the code that would write it again is unchanged."""
    h = hashlib.sha256(RECIPE.encode())
    for path in sorted(f for pattern in patterns for f in ROOT.glob(pattern)):
        h.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return h.hexdigest()[:10]


def build_checkpoints(preset: str, cache: Path,
                      variants: tuple[str, ...] = VARIANTS) -> dict[str, Path]:
    """{variant: checkpoint dir}: random bf16 weights (seed 0) and its rtn 4-bit version
    (built only when "4bit" is in `variants`; bench/chat_prefix.py needs bf16 alone)."""
    plain = code_key("fanformer/*.py")
    paths = {"bf16": cache / f"{preset}-random-bf16-{plain}",
             "4bit": cache / f"{preset}-random-rtn4-g128-head-int8-"
                             f"{code_key('fanformer/*.py', 'quant/*.py')}"}
    if not (paths["bf16"] / "config.json").is_file():
        print(f"building the random {preset} checkpoint in {paths['bf16']}", flush=True)
        config = ModelConfig.from_preset(preset, dropout=0.0)
        tokenizer = words_tokenizer(config.vocab_size)
        torch.manual_seed(0)
        model = FANformer(config).eval()
        with torch.no_grad():  # tied head: tokens that are not text get logit 0, never the max
            model.embed.weight[[i for i in range(config.padded_vocab_size)
                                if not is_whole_text(tokenizer, i)]] = 0
        save_checkpoint(paths["bf16"], model, tokenizer, dtype=torch.bfloat16)
    if "4bit" in variants and not is_quantized(paths["4bit"]):
        print(f"quantizing it: fanformer-quantize {' '.join(QUANTIZE)}", flush=True)
        run_checked([sys.executable, "-m", "quant.cli", *QUANTIZE, "--checkpoint",
                     str(paths["bf16"]), "--output", str(paths["4bit"]), "--eval_tokens", "0",
                     "--quiet"], "fanformer-quantize")
    return paths


def run_checked(cmd: list[str], what: str, **kw) -> str:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"side_by_side: {what} failed (exit {done.returncode}): {last}")
    return done.stdout


# ---- the anchor ----
def add_anchor_args(p: argparse.ArgumentParser) -> None:
    """The llama-server anchor's flags (this bench's and chat_prefix's)."""
    p.add_argument("--no-llama", "--no_llama", action="store_true", dest="no_llama",
                   help="our server only, even where the anchors exist")
    p.add_argument("--anchors", type=Path, default=ROOT.parent / "shared" / "anchors",
                   help="the anchors folder (setup.sh, load.py, bin/llama-server)")
    p.add_argument("--llama-server", "--llama_server", type=Path, dest="llama_server",
                   default=None,
                   help="a llama-server binary instead of the anchors' bin/ one (which is built "
                        "for AVX-512: it prints --version on an AVX2 CPU, then dies of an "
                        "illegal instruction when it computes); build one as setup.sh does")
    p.add_argument("--anchors-work", "--anchors_work", type=Path, dest="anchors_work",
                   default=Path.home() / ".cache" / "fanformer-anchors",
                   help="where setup.sh writes the GGUFs (its ANCHORS_WORK)")


def find_llama(args) -> tuple[Path | None, str]:
    """(llama-server path, "") when usable, else (None, why the llama rows are skipped).
    Runs the anchors' setup.sh (about a minute) when the GGUFs are missing."""
    if args.no_llama:
        return None, "--no-llama given"
    setup = args.anchors / "setup.sh"
    if not setup.is_file():
        return None, f"{args.anchors} has no setup.sh (anchors absent)"
    server = args.llama_server or args.anchors / "bin" / "llama-server"
    ready = all((args.anchors_work / "gguf" / g).is_file() for g in GGUF.values()) and \
        server.is_file() and subprocess.run([server, "--version"],
                                            capture_output=True).returncode == 0
    if not ready:
        print(f"running {setup} (about a minute; writes {args.anchors_work})", flush=True)
        out = run_checked(["bash", str(setup)], "the anchors' setup.sh",
                          env={**os.environ, "PY": sys.executable,
                               "ANCHORS_WORK": str(args.anchors_work)})
        server = args.llama_server or Path(out.strip().splitlines()[-1])  # the GGUFs only
    return server, ""


# ---- servers ----
class Server:
    """One server subprocess: started on a free loopback port, its log in a file, stopped by
    its PID with SIGTERM (then SIGKILL after 60 s)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None,
                 cwd: Path = ROOT):
        """`env`: the server's whole environment (default: this process's); `cwd`: the
        source tree `python -m server.cli` imports (default: this checkout)."""
        self.name, self.port, self.log = name, free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "w") as f:
            self.proc = subprocess.Popen([*argv, "--port", str(self.port)], cwd=cwd,
                                         stdout=f, stderr=subprocess.STDOUT, env=env)
        self.ps = psutil.Process(self.proc.pid)

    def wait_healthy(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"side_by_side: {self.name} did not become healthy "
                         f"(exit {self.proc.poll()}); its log: {self.log}")

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_servers(specs: list[tuple[str, list[str]]], logdir: Path,
                  stack: ExitStack, env: dict | None = None, cwd: Path = ROOT) -> list[Server]:
    servers = []
    for name, argv in specs:
        server = Server(name, argv, logdir / f"{name.replace(' ', '_')}-{time.time_ns()}.log",
                        env, cwd)
        stack.callback(server.stop)
        servers.append(server)
    for server in servers:
        server.wait_healthy()
    return servers


# ---- load ----
def run_load(url: str, streams: int, requests: int, mode: str, max_tokens: int, args,
             seed: int, tmp: Path) -> dict:
    """One load-generator run; returns its figures in one shape whichever generator ran."""
    sampling = MODES[mode]
    out = tmp / f"load-{time.time_ns()}.json"
    load_py = args.anchors / "load.py"
    if load_py.is_file():
        cmd = [sys.executable, str(load_py), "--base-url", url, "--model", "bench",
               "-n", str(requests), "-c", str(streams), "--prompt-mode", "ids",
               "--prompt-len", str(args.prompt_len), "--max-tokens", str(max_tokens),
               "--ignore-eos", "--temperature", str(sampling["temperature"]), "--warmup", "1",
               "--seed", str(seed), "--max-duration", "900", "--json", str(out)]
        if "top_p" in sampling:
            cmd += ["--extra-body", json.dumps({"top_p": sampling["top_p"]})]
    else:
        ids = random.Random(seed).choices(range(300, 30000), k=args.prompt_len)
        cmd = [sys.executable, str(ROOT / "clients" / "loadgen.py"), "--url", url + "/v1",
               "--model", "bench", "--concurrency", str(streams), "--num_requests",
               str(requests), "--max_tokens", str(max_tokens), "--ignore_eos",
               "--prompt_ids", ",".join(map(str, ids)), "--temperature",
               str(sampling["temperature"]), "--warmup", "1", "--json", str(out)]
        if "top_p" in sampling:
            cmd += ["--top_p", str(sampling["top_p"])]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if not out.is_file():
        raise SystemExit(f"side_by_side: the load generator wrote nothing for {url}")
    r = json.loads(out.read_text().splitlines()[-1] if load_py.is_file() else out.read_text())
    out.unlink()
    if load_py.is_file():
        return {"output_tok_s": r["output_throughput"], "ttft_ms_p50": r["ttft_ms"]["p50"],
                "tpot_ms_p50": r["tpot_ms"]["p50"], "itl_ms_p50": r["itl_ms"]["p50"],
                "requests": r["num_requests"], "failed": r["failed"] + r["cancelled"],
                "short_outputs": r["short_outputs"], "errors": r["errors"],
                "duration_s": r["duration_s"], "client_cpu_s": round(client_cpu, 2)}
    return {"output_tok_s": r["output_tokens_per_s"], "ttft_ms_p50": r["ttft_ms"]["p50"],
            "tpot_ms_p50": None, "itl_ms_p50": r["itl_ms"]["p50"], "requests": r["requests"],
            "failed": r["errors"], "short_outputs": None, "errors": r["error_samples"],
            "duration_s": r["wall_s"], "client_cpu_s": round(client_cpu, 2)}


# ---- the linear-only ceiling ----
class LinearCeiling:
    """Tokens/s if a batch-1 decode step were nothing but its nn.Linear matmuls (bf16,
    weights streamed from memory as in a real step, through the kernel the engine runs them
    on at one row: the native step's C bf16 linear where that step runs, else torch's
    one-row kernel, server/cpu_linear.py), on the engine's thread count there:
    bench/step_profile.py's `LinearsAlone` at one row. Measured right before and right
    after each of our bf16 1-stream points, not once a round: this machine's memory speed
    drifts within minutes (the same loop took 9.5 and 20.0 ms/step in two rounds of one
    run), and a ceiling from another minute than the stream it judges measures the drift,
    not the stream."""

    def __init__(self, checkpoint: Path):
        from step_profile import LinearsAlone, native_linears

        from server.cpu_linear import use_cpu_linears

        model, _ = load_checkpoint(checkpoint, dtype=torch.bfloat16)
        use_cpu_linears(model)  # the one-row kernel the engine runs them with
        self.loop = LinearsAlone(model, 1, torch.bfloat16, native_linears(model, 1))

    def measure(self, steps: int = 32, repeats: int = 5) -> dict:
        for _ in range(4):
            self.loop()
        times = []
        for _ in range(repeats):
            self.loop.times.clear()
            for _ in range(steps):
                self.loop()
            times.append(sum(self.loop.times) / steps)
        step_s = sorted(times)[len(times) // 2]
        return {"threads": self.loop.threads, "linears": len(self.loop.leaves),
                "kernel": "native bf16" if self.loop.native else "torch",
                "step_ms": round(step_s * 1e3, 3), "tok_s": round(1 / step_s, 1),
                "weight_mb": round(sum(m.weight.numel() for m in self.loop.leaves) * 2 / 1e6,
                                   1)}


WARMUP_SEED = 999  # the warm-up's prompts: below every point's seed


def point_seed(rnd: int, mode: str, streams: int) -> int:
    """The load generator's seed for one point: prompts that no other point of the run sends
    (the two servers of a point get the same ones). fanformer-serve keeps a finished
    request's full prompt blocks in its prefix cache (on by default), so a point replaying
    an earlier point's prompts skips their prefill, which llama-server (`--no-cache-prompt`)
    does not: before 2026-12-01 15:00 UTC each sampled point replayed the greedy point's
    prompts on the same server (docs/BENCHMARKS.md). load.py seeds request i with
    seed * 1,000,003 + i, so seeds 1,000 apart never share a prompt."""
    return 1000 * (1 + rnd * len(MODES) + list(MODES).index(mode)) + streams


def measure_group(servers: list[Server], variant: str, model: str, rnd: int, args,
                  tmp: Path, points: list[dict], ceiling: LinearCeiling | None = None,
                  ceilings: list[dict] | None = None) -> None:
    """Every (mode, streams) point on each server in turn, after a warm-up of each; with
    `ceiling`, it is measured into `ceilings` right before and after our 1-stream points."""
    top = max(args.streams)
    for s in servers:  # unrecorded: the largest batch's kernels and buffers, both modes
        for mode in args.modes:
            run_load(s.url, top, top, mode, min(args.max_tokens, 16), args, WARMUP_SEED, tmp)
    for mode in args.modes:
        for streams in args.streams:
            for s in servers:
                others = [(o, o.cpu_seconds()) for o in servers if o is not s]
                load = os.getloadavg()
                judged = ceiling is not None and streams == 1 and s.name == OURS
                if judged:
                    _measure_ceiling(ceiling, ceilings, "before", rnd, model, mode)
                cpu0 = s.cpu_seconds()
                r = run_load(s.url, streams, requests_for(streams, args), mode,
                             args.max_tokens, args, point_seed(rnd, mode, streams), tmp)
                if judged:
                    _measure_ceiling(ceiling, ceilings, "after", rnd, model, mode)
                r.update(round=rnd, model=model, variant=variant, mode=mode, streams=streams,
                         server=s.name, loadavg_before=[round(x, 2) for x in load],
                         server_cpu_s=round(s.cpu_seconds() - cpu0, 2),
                         idle_server_cpu_s=round(sum(o.cpu_seconds() - c for o, c in others),
                                                 2))
                points.append(r)
                flag = "" if not r["failed"] and not r["short_outputs"] else \
                    f"  !! failed {r['failed']}, short {r['short_outputs']}: {r['errors']}"
                ttft = r["ttft_ms_p50"] or float("nan")
                print(f"  round {rnd} {model} {variant} {mode} {streams:>3} streams "
                      f"{s.name:<16} {r['output_tok_s']:8.1f} tok/s  TTFT p50 {ttft:.0f} ms  "
                      f"load {load[0]:.2f}{flag}", flush=True)


def _measure_ceiling(ceiling: LinearCeiling, ceilings: list[dict], at: str, rnd: int,
                     model: str, mode: str) -> None:
    load = os.getloadavg()[0]
    c = ceiling.measure()
    ceilings.append({"round": rnd, "model": model, "mode": mode, "at": at,
                     "loadavg_before": load, **c})
    print(f"  round {rnd} {model}: linear-only ceiling {at} the {mode} 1-stream point "
          f"{c['tok_s']} tok/s ({c['threads']} thread(s), {c['step_ms']} ms/step)", flush=True)


def ours_argv(checkpoint: Path) -> list[str]:
    return [sys.executable, "-m", "server.cli", "--checkpoint", str(checkpoint),
            "--max_num_seqs", "64", "--served_model_name", "bench"]


def run(args) -> dict:
    llama, skipped = find_llama(args) if ANCHOR_PRESET in args.models else (None, "")
    if skipped:
        print(f"llama-server rows skipped: {skipped}", flush=True)
    if not (args.anchors / "load.py").is_file():
        print("load generator: clients/loadgen.py (the anchors' load.py is absent)", flush=True)
    checkpoints = {m: build_checkpoints(m, args.cache) for m in args.models}
    logdir = args.cache / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    points, ceilings = [], []
    loops: dict[str, LinearCeiling] = {}  # model -> its ceiling loop, loaded once
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for model in args.models:
                for variant in args.variants:
                    specs = [("fanformer-serve", ours_argv(checkpoints[model][variant]))]
                    if llama and model == ANCHOR_PRESET:
                        gguf = args.anchors_work / "gguf" / GGUF[variant]
                        specs.append(("llama-server", [str(llama), "-m", str(gguf), "--host",
                                                       "127.0.0.1", *LLAMA_FLAGS]))
                    if rnd % 2:
                        specs.reverse()  # the other server goes first in odd rounds
                    with ExitStack() as stack:
                        servers = start_servers(specs, logdir, stack)
                        judge = variant == "bf16" and 1 in args.streams
                        if judge and model not in loops:
                            loops[model] = LinearCeiling(checkpoints[model]["bf16"])
                        measure_group(servers, variant, model, rnd, args, Path(tmp), points,
                                      loops.get(model) if judge else None, ceilings)
    return {"points": points, "ceilings": ceilings,
            "llama_server": None if llama is None else {
                "path": str(llama), "flags": LLAMA_FLAGS, "version": subprocess.run(
                    [llama, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True).stdout.strip()},
            "llama_skipped": skipped or None}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                               "MALLOC_ARENA_MAX") if k in os.environ}}


def main(argv=None) -> int:
    args = parse_args(argv)
    started = datetime.now(timezone.utc)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "started_utc": started.isoformat(timespec="seconds"), "machine": machine(),
              "protocol": {"prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                           "streams": args.streams, "requests": {
                               s: requests_for(s, args) for s in args.streams},
                           "rounds": args.rounds, "modes": {m: MODES[m] for m in args.modes},
                           "quantize": QUANTIZE, "load_generator": str(
                               args.anchors / "load.py" if (args.anchors / "load.py").is_file()
                               else ROOT / "clients" / "loadgen.py")}}
    result.update(run(args))
    result["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["summary"] = summarize(result)
    markdown = report_markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown)
    print("\n" + markdown)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
