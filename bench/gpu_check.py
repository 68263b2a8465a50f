"""The one GPU run of issue 17, as one command: tests, engine, HTTP and training figures.

    PYTHONPATH=. python3 bench/gpu_check.py --device cuda --out gpu_check.json
    PYTHONPATH=. python3 bench/gpu_check.py --device cpu --quick --out /tmp/rehearsal.json

Five steps, each in its own subprocess with its own time limit, so a failed or hung step is
recorded and the next one still runs; the whole run keeps inside --budget_s (the device
tool gives one command 10 minutes):
  1. tests: the device-parametrized relational tests (`pytest -k <device>`: engine ==
     reference, alone == batched, quantized layers == dequantized reference, cached ==
     full forward); a CUDA case is skipped, visibly, where there is no GPU.
  2. engine: output tokens/s and TTFT of the engine alone at 1 / 16 / 64 / 256 concurrent
     requests (64-token prompts, 64 new tokens, EOS ignored), greedy and sampled, bf16 and
     rtn 4-bit g128 (int8 head), transformer-64m and fanformer-92m, random weights
     (checkpoints built as bench/side_by_side.py builds them).
  3. http: bench/bench_http.py (engine alone vs fanformer-serve through clients/loadgen.py)
     on the bf16 checkpoints, when fastapi, uvicorn and sse-starlette import; else recorded
     as skipped (the device machine lacks them: bench/gpu_check.sh carries the wheels).
  4. train_speed: training tokens/s of fanformer-92m, bf16 autocast, eager and compiled
     (bench/bench_train.py).
  5. train_run: `fanformer-train` on fanformer-92m (bf16, compiled) for what is left of the
     budget, up to --train_minutes, its step count sized from step 4's compiled tokens/s so
     that it ends with the trainer's final eval: bits/byte on fanformer/assets/eval.txt.
Writes the JSON after every step (a killed run keeps the steps done) and a Markdown table
beside it. --quick shrinks every size (test presets, 1 / 2 streams, a few steps) to rehearse
each code path on a CPU in a few minutes; it measures nothing worth quoting.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "engine", "http", "train_speed", "train_run")
DEVICE_TEST_FILES = ["tests/test_model.py", "tests/test_generate.py", "tests/test_engine.py",
                     "tests/test_quant_layers.py", "tests/test_quant_engine.py"]
# (full, quick) sizes
SIZES = {
    "models": (["transformer-64m", "fanformer-92m"], ["transformer-test", "test"]),
    "streams": ([1, 16, 64, 256], [1, 2]),
    "tokens": ((64, 64), (16, 8)),  # (prompt, new)
    "train_preset": ("fanformer-92m", "test"),
    "train_batch": ((32, 1024), (4, 64)),  # (sequences, tokens each)
    "train_steps": ((10, 3), (2, 1)),  # (timed, warm-up)
    "test_files": (DEVICE_TEST_FILES, ["tests/test_model.py"]),
    "http_models": (["transformer-64m", "fanformer-92m"], ["tiny"]),
}
# seconds each step may take at most (full, quick); train_run gets what is left
LIMITS = {"tests": (150, 240), "engine": (150, 300), "http": (90, 180),
          "train_speed": (150, 240)}  # torch.compile of fanformer-92m: about a minute?
MODES = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.8, "top_p": 0.95}}


def size(args, key):
    return SIZES[key][1 if args.quick else 0]


# ---- running a step ----
def run_logged(cmd: list[str], timeout: float, log: Path) -> tuple[int | None, float]:
    """Run `cmd` from the repo root with its output in `log`; (exit code or None on
    timeout, seconds). A timed-out step is killed with its whole process group."""
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, time.monotonic() - start


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def worker_cmd(args, name: str, jsonl: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--device",
            args.device, "--jsonl", str(jsonl), *(["--quick"] if args.quick else [])]


def status_of(code: int | None, ok: bool = True) -> str:
    return "timeout" if code is None else "ok" if code == 0 and ok else "failed"


# ---- the steps (orchestrator side) ----
def step_tests(args, work: Path, limit: float) -> dict:
    log = work / "tests.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
           "-k", args.device, f"--timeout={int(limit)}", *size(args, "test_files")]
    code, seconds = run_logged(cmd, limit, log)
    summary = tail(log, 1)
    counts = {}
    for part in summary.strip("= ").split(" in ")[0].split(", "):
        n, _, what = part.partition(" ")
        if n.isdigit():
            counts[what] = int(n)
    return {"status": status_of(code, bool(counts.get("passed"))), "command": " ".join(cmd[1:]),
            "counts": counts, "summary": summary, "seconds": round(seconds, 1),
            "tail": tail(log, 40) if code != 0 else ""}


def step_worker(args, work: Path, limit: float, name: str) -> dict:
    jsonl, log = work / f"{name}.jsonl", work / f"{name}.log"
    code, seconds = run_logged(worker_cmd(args, name, jsonl), limit, log)
    rows = read_jsonl(jsonl)
    return {"status": status_of(code, bool(rows)), "rows": rows, "seconds": round(seconds, 1),
            "tail": tail(log) if code != 0 else ""}


def step_http(args, work: Path, limit: float) -> dict:
    missing = [m for m in ("fastapi", "uvicorn", "sse_starlette")
               if importlib.util.find_spec(m) is None]
    if missing:
        return {"status": "skipped", "seconds": 0.0,
                "why": f"no {', '.join(missing)} on this machine; carry the wheels "
                       "(bash bench/gpu_check.sh prepare)"}
    prompt, new = size(args, "tokens")
    out, log = work / "http.json", work / "http.log"
    cmd = [sys.executable, "bench/bench_http.py", "--models", *size(args, "http_models"),
           "--concurrency", *map(str, size(args, "streams")), "--device", args.device,
           "--dtype", "bfloat16", "--max_tokens", str(new), "--prompt_tokens", str(prompt),
           "--out", str(out)]
    code, seconds = run_logged(cmd, limit, log)
    report = json.loads(out.read_text()) if out.is_file() else None
    return {"status": status_of(code, report is not None), "command": " ".join(cmd[1:]),
            "report": report, "seconds": round(seconds, 1),
            "tail": tail(log) if code != 0 else ""}


def step_train_run(args, work: Path, limit: float, speed: dict | None) -> dict:
    """fanformer-train for up to --train_minutes (less if the budget is short), sized in
    steps from the compiled tokens/s so that it reaches its own final eval."""
    data = Path(args.train_data)
    if data.suffix == ".gz":  # the carried text is gzipped to fit the device tool's 64 MiB
        plain = work / data.stem
        with gzip.open(data, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        data = plain
    batch, seq_len = size(args, "train_batch")
    minutes = max(min(args.train_minutes, (limit - 60) / 60), 0.2)
    rows = [r for r in (speed or {}).get("rows", []) if r.get("compile")]
    if rows:  # steps that fill the minutes once compiled; the compile itself comes first
        train_s = max(minutes * 60 - rows[0]["warmup_s"], 10)
        max_steps = max(int(train_s * rows[0]["tokens_per_s"] / (batch * seq_len)), 5)
    else:  # no speed figure: stop on time (then no final eval; the last periodic one counts)
        max_steps = 10 ** 7
    out_dir = work / "train_run"
    cmd = [sys.executable, "-m", "fanformer.train", str(data), "--preset",
           size(args, "train_preset"), "--device", args.device, "--precision", "bf16",
           "--compile", "--eval_file", str(ROOT / "fanformer" / "assets" / "eval.txt"),
           "--out_dir", str(out_dir), "--batch_size", str(batch), "--seq_len", str(seq_len),
           "--max_steps", str(max_steps), "--max_minutes", f"{minutes + 1:.2f}",
           "--warmup_steps", str(min(100, max_steps // 10)), "--log_every", "10",
           "--eval_every", "0" if rows else "100", "--save_every", str(max_steps)]
    if args.quick:
        cmd += ["--vocab_size", "512"]
    log = work / "train_run.log"
    code, seconds = run_logged(cmd, limit, log)
    metrics = read_jsonl(out_dir / "metrics.jsonl")
    evals = [m for m in metrics if "eval_bits_per_byte" in m]
    steps = [m for m in metrics if "tokens_per_s" in m]
    start = next((m for m in metrics if m.get("event") == "start"), {})
    result = {"status": status_of(code, bool(evals)), "command": " ".join(cmd[1:]),
              "seconds": round(seconds, 1), "minutes_asked": round(minutes, 2),
              "parameters": start.get("parameters"), "steps": steps[-1]["step"] if steps else 0,
              "tokens": steps[-1]["tokens"] if steps else 0,
              "median_tokens_per_s": round(statistics.median(
                  m["tokens_per_s"] for m in steps[1:] or steps)) if steps else None,
              "final_loss": steps[-1]["loss"] if steps else None,
              "eval": evals[-1] if evals else None, "tail": tail(log) if code != 0 else ""}
    result["eval_is_final"] = bool(evals and evals[-1].get("final"))
    return result


# ---- the workers (run in a subprocess by the steps above) ----
def worker_engine(args, emit) -> None:
    from side_by_side import build_checkpoints  # bench/ is on sys.path: run as a script

    from quant import load_any_checkpoint
    from server.engine import EngineConfig, LLMEngine
    from server.sampling import SamplingParams

    prompt_len, new = size(args, "tokens")
    streams = size(args, "streams")
    cache = Path(args.jsonl).parent / "checkpoints"
    for preset in size(args, "models"):
        for variant, path in build_checkpoints(preset, cache).items():
            model, tokenizer = load_any_checkpoint(path, args.device, dtype=torch.bfloat16)
            config = EngineConfig(device=args.device, dtype="bfloat16",
                                  max_num_seqs=max(streams), max_model_len=prompt_len + new)
            engine = LLMEngine(model, tokenizer, config)
            vocab = model.config.vocab_size
            engine_point(engine, SamplingParams, max(streams), prompt_len, 4, "sampled", vocab)
            for mode in MODES:
                for c in streams:
                    point = engine_point(engine, SamplingParams, c, prompt_len, new, mode, vocab)
                    emit({"model": preset, "variant": variant, "mode": mode, "streams": c,
                          **point})
            del engine, model
            if args.device == "cuda":
                torch.cuda.empty_cache()


def engine_point(engine, sampling_params, c: int, prompt_len: int, new: int, mode: str,
                 vocab: int) -> dict:
    """c requests at once, stepped to the end: output tok/s, TTFT mean and p50."""
    g = torch.Generator().manual_seed(c)
    prompts = torch.randint(3, vocab, (c, prompt_len), generator=g).tolist()
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{mode}{c}-{i}-{start}", p, sampling_params(
            max_tokens=new, ignore_eos=True, seed=i, **MODES[mode]))
    first: dict[str, float] = {}
    tokens = steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.token_ids)
            first.setdefault(out.request_id, time.perf_counter() - start)
        steps += 1
    elapsed = time.perf_counter() - start
    ttft = sorted(first.values())
    peak = torch.cuda.max_memory_allocated() / 2**30 if engine.device.type == "cuda" else None
    return {"tok_s": round(tokens / elapsed, 1), "ttft_ms_mean": round(1e3 * sum(ttft) /
            len(ttft), 1), "ttft_ms_p50": round(1e3 * ttft[len(ttft) // 2], 1),
            "steps": steps, "seconds": round(elapsed, 3),
            "peak_gib": round(peak, 2) if peak is not None else None}


def worker_train_speed(args, emit) -> None:
    from bench_train import bench

    batch, seq_len = size(args, "train_batch")
    steps, warmup = size(args, "train_steps")
    for compile in (False, True):
        emit(bench(size(args, "train_preset"), "bf16", args.device, batch, seq_len, steps,
                   warmup, 512 if args.quick else None, compile=compile))


WORKERS = {"engine": worker_engine, "train_speed": worker_train_speed}


# ---- report ----
def environment(args) -> dict:
    env = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
           "device": args.device, "quick": args.quick, "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(),
           "host": platform.node(), "cpus": os.cpu_count(), "command": " ".join(sys.argv)}
    if args.device == "cuda" and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name()
    else:
        env["device_name"] = platform.processor() or platform.machine()
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       capture_output=True, text=True).stdout.strip() or None
    except OSError:
        env["commit"] = None
    return env


def markdown(report: dict) -> str:
    env, steps = report["environment"], report["steps"]
    quick = ", --quick: sizes shrunk, figures not for quoting" if env["quick"] else ""
    lines = [f"# gpu_check: {env['device_name']} ({env['device']})", "",
             f"{env['date_utc']} UTC, torch {env['torch']} (CUDA {env['cuda']}), Python "
             f"{env['python']}, commit {env['commit']}{quick}.", "", f"`{env['command']}`", "",
             "| step | status | seconds | |", "|---|---|---:|---|"]
    for name, s in steps.items():
        note = s.get("summary") or s.get("why") or ""
        if name == "train_run" and s.get("eval"):
            note = (f"{s['steps']} steps, {s['tokens']:,} tokens, eval bits/byte "
                    f"{s['eval']['eval_bits_per_byte']:.4f}"
                    f"{'' if s['eval_is_final'] else ' (periodic eval: stopped on time)'}")
        lines.append(f"| {name} | {s['status']} | {s['seconds']} | {note} |")
    if steps.get("engine", {}).get("rows"):
        lines += ["", "## Engine alone (output tok/s, TTFT)", "",
                  "| model | variant | mode | streams | tok/s | TTFT p50 ms | peak GiB |",
                  "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['variant']} | {r['mode']} | {r['streams']} | "
                  f"{r['tok_s']:,.0f} | {r['ttft_ms_p50']} | {r['peak_gib'] or ''} |"
                  for r in steps["engine"]["rows"]]
    http = (steps.get("http") or {}).get("report")
    if http:
        lines += ["", "## HTTP (bench/bench_http.py JSON)", "", "```",
                  json.dumps(http, indent=1)[:6000], "```"]
    if steps.get("train_speed", {}).get("rows"):
        lines += ["", "## Training tokens/s (bf16 autocast, random tokens)", "",
                  "| model | compile | batch x seq | tokens/s | warm-up s |",
                  "|---|---|---|---:|---:|"]
        lines += [f"| {r['model']} | {r['compile']} | {r['batch']} x {r['seq_len']} | "
                  f"{r['tokens_per_s']:,} | {r['warmup_s']} |"
                  for r in steps["train_speed"]["rows"]]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    """The JSON and its .md, rewritten after every step; each lands whole (temporary file,
    then rename), since a check past its time limit is killed, maybe mid-write."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(report, indent=2)),
                       (out.with_suffix(".md"), markdown(report))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a CPU rehearsal")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"),
                   help="JSON to write; the Markdown table goes beside it (.md)")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    p.add_argument("--budget_s", type=float, default=570,
                   help="the whole run's seconds (the device tool allows 600 per command)")
    p.add_argument("--train_minutes", type=float, default=None,
                   help="the training run's length at most, less when the budget is short "
                        "(default 5; 0.5 with --quick)")
    p.add_argument("--train_data", default=None,
                   help="training text (.txt or .txt.gz); default ../shared/data/train.txt, "
                        "or tests/fixtures/tiny.txt with --quick")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--jsonl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    if args.train_data is None:
        args.train_data = str(ROOT / ("tests/fixtures/tiny.txt" if args.quick else
                                      "../shared/data/train.txt"))
    if args.train_minutes is None:
        args.train_minutes = 0.5 if args.quick else 5.0
    args.train_data = str(Path(args.train_data).resolve())
    if args.out.suffix == ".md":  # the report goes to its .md: it would replace the JSON
        p.error(f"--out {args.out} ends in .md; name the JSON (the .md is written beside it)")
    if args.out.exists() or args.out.with_suffix(".md").exists():
        p.error(f"{args.out} (or its .md) exists; pass another --out")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but torch sees no CUDA device "
                "(rehearse with --device cpu --quick)")
    if "train_run" in args.steps and not Path(args.train_data).is_file():
        p.error(f"--train_data {args.train_data} does not exist")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        with open(args.jsonl, "a") as f:
            WORKERS[args.worker](args, lambda row: print(json.dumps(row), file=f, flush=True))
        return 0
    deadline = time.monotonic() + args.budget_s
    report = {"environment": environment(args), "steps": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        for name in STEPS:
            if name not in args.steps:
                continue
            left = deadline - time.monotonic()
            limit = left if name == "train_run" else min(LIMITS[name][args.quick], left)
            print(f"[gpu_check] {name}: up to {limit:.0f} s", flush=True)
            if limit < 20:
                result = {"status": "skipped", "seconds": 0.0, "why": "no time left"}
            elif name == "tests":
                result = step_tests(args, work, limit)
            elif name == "http":
                result = step_http(args, work, limit)
            elif name == "train_run":
                result = step_train_run(args, work, limit, report["steps"].get("train_speed"))
            else:
                result = step_worker(args, work, limit, name)
            report["steps"][name] = result
            print(f"[gpu_check] {name}: {result['status']} in {result['seconds']} s", flush=True)
            write(report, args.out)
    print(markdown(report))
    return 0 if all(s["status"] in ("ok", "skipped") for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
