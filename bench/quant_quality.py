"""Quantization quality on one checkpoint: bits/byte on the whole eval text per method,
over calibration seeds, with the difference to round-to-nearest in units of the pooled sd.

    python bench/quant_quality.py --checkpoint fanformer/assets/demo --out runs/qq.jsonl
    python bench/quant_quality.py --checkpoint fanformer/assets/demo --out /tmp/qq.jsonl \\
        --eval_bytes 20000 --calib_samples 8      # a smoke run: numbers mean nothing

Methods (group size 128): bf16 (the checkpoint as stored, computed in fp32), int8, nf4,
rtn, awq, gptq and gptq --desc_act at 4 bits, and rtn and gptq at 3 bits. Each quantized
model is made by `fanformer-quantize` (in process) into a temporary folder, reloaded as
users load it, its non-quantized tensors cast to fp32, and scored with
`fanformer.data.bits_per_byte` on `read_eval_text(--eval_data)` (Gutenberg credits
stripped), in windows of 512 tokens, with every layer that has a weight-only kernel
running it (`quant.layers.weight_only_everywhere`: bf16 activations, so the figure is the
weights' error; 3-bit layers have no such kernel and run w8a8). `--kernels native` scores
4-bit layers on the native kernel instead (int8 activations per weight group: what
fanformer-serve computes on a CPU that runs it). gptq and awq run once
per --seeds value (the seed picks the calibration windows); bf16, int8, nf4 and rtn use
no calibration data, are deterministic, and run once: their sd is 0 by construction, not
by measurement.

Resumable: one JSON record per (method, bits, seed) is appended to --out as it finishes;
a rerun skips the ones there and refuses a file written with other settings. The end is
a Markdown table (also when everything was already done). Knows quant's command line,
loaders and kernel policy switch, not its internals.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fanformer.checkpoint import (  # noqa: E402
    DEMO_CHECKPOINT,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
)
from fanformer.data import EVAL_TEXT, bits_per_byte, read_eval_text  # noqa: E402
from quant import load_any_checkpoint, native_cpu  # noqa: E402
from quant.calibration import DEFAULT_CALIB_TEXT  # noqa: E402
from quant.cli import build_parser, quantize  # noqa: E402
from quant.config import QuantError  # noqa: E402
from quant.convert import cast_float_tensors  # noqa: E402
from quant.layers import weight_only_everywhere  # noqa: E402

GROUP_SIZE = 128
# (label, method, bits, extra flags); calibrated = method in CALIBRATED
METHODS = [("bf16", None, 16, []), ("int8", "int8", 8, []), ("nf4", "nf4", 4, []),
           ("rtn", "rtn", 4, []), ("awq", "awq", 4, []), ("gptq", "gptq", 4, []),
           ("gptq --desc_act", "gptq", 4, ["--desc_act"]), ("rtn", "rtn", 3, []),
           ("gptq", "gptq", 3, [])]
CALIBRATED = ("gptq", "awq")


class BenchError(Exception):
    """Bad input; the message is one line for the user."""


def settings_of(args) -> dict:
    """What makes two records comparable; a rerun must match the file's records."""
    weights = Path(args.checkpoint) / WEIGHTS_FILE
    if not weights.is_file():
        raise BenchError(f"{args.checkpoint} is not a checkpoint (no {WEIGHTS_FILE})")
    stat = weights.stat()
    return {"checkpoint": str(Path(args.checkpoint).resolve()),
            "weights_bytes": stat.st_size, "weights_mtime_ns": stat.st_mtime_ns,
            "eval_data": str(Path(args.eval_data).resolve()), "eval_bytes": args.eval_bytes,
            "eval_seq_len": args.eval_seq_len, "group_size": GROUP_SIZE,
            "calib_data": str(Path(args.calib_data).resolve()),
            "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
            **({"kernels": "native"} if args.kernels == "native" else {})}


def read_records(out: Path, settings: dict) -> list[dict]:
    """The records already in --out (none if absent); refuse a file that is not ours or
    was written with other settings."""
    if not out.exists():
        return []
    records = []
    for number, line in enumerate(out.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise BenchError(f"{out}:{number} is not a JSON record; pass another --out") from None
        if not isinstance(record, dict) or "settings" not in record:
            raise BenchError(f"{out} was not written by bench/quant_quality.py; pass another "
                             "--out")
        if record["settings"] != settings:
            diff = sorted(k for k in settings if record["settings"].get(k) != settings[k])
            raise BenchError(f"{out} holds results for other settings (differ in "
                             f"{', '.join(diff)}); pass another --out")
        records.append(record)
    return records


def eval_text(args) -> str:
    text = read_eval_text(args.eval_data)
    if args.eval_bytes:
        text = text.encode("utf-8")[: args.eval_bytes].decode("utf-8", errors="ignore")
    return text


def score(model, tokenizer, text: str, seq_len: int) -> dict:
    """The weights' own error: every layer with a weight-only kernel runs it (bf16
    activations) at any row count, instead of int8 activations on long windows."""
    seq_len = min(seq_len, model.config.max_seq_len)
    with weight_only_everywhere():
        return bits_per_byte(model, tokenizer, text, seq_len=seq_len, batch_size=4)


def run_one(args, text: str, label: str, method: str | None, bits: int, extra: list[str],
            seed: int | None) -> dict:
    """Quantize (unless bf16), reload, score; returns the record without its settings."""
    start = time.perf_counter()
    if method is None:
        model, tokenizer = load_checkpoint(args.checkpoint, dtype=torch.float32)
        result = score(model, tokenizer, text, args.eval_seq_len)
    else:
        with tempfile.TemporaryDirectory(prefix="quant_quality-") as tmp:
            out = Path(tmp) / "q"
            flags = ["--method", method, "--bits", str(bits), "--group_size", str(GROUP_SIZE),
                     "--checkpoint", args.checkpoint, "--output", str(out),
                     "--calib_data", args.calib_data, "--calib_samples",
                     str(args.calib_samples), "--calib_seq_len", str(args.calib_seq_len),
                     "--seed", str(seed or 0), "--eval_tokens", "0", "--quiet", *extra]
            quantize(build_parser().parse_args(flags))
            model, tokenizer = load_any_checkpoint(out)
            cast_float_tensors(model, torch.float32)  # as the quant report compares
            result = score(model, tokenizer, text, args.eval_seq_len)
    return {"method": label, "bits": bits, "seed": seed,
            "calibrated": method in CALIBRATED, "bits_per_byte": result["bits_per_byte"],
            "tokens": result["tokens"], "bytes": result["bytes"],
            "seconds": round(time.perf_counter() - start, 1)}


def plan(seeds: list[int], methods: list[str] | None = None) -> list[tuple]:
    """Every (label, method, bits, extra, seed) to run: the deterministic ones first, then
    one calibration seed of every calibrated method at a time, so a partial file already
    holds a whole table. `methods`: only these labels (e.g. "rtn", "gptq --desc_act")."""
    chosen = [m for m in METHODS if methods is None or m[0] in methods]
    fixed = [(*m, None) for m in chosen if m[1] not in CALIBRATED]
    calibrated = [(*m, s) for s in seeds for m in chosen if m[1] in CALIBRATED]
    return fixed + calibrated


def summarize(records: list[dict]) -> list[dict]:
    """One row per (method, bits): n, mean, sd; and vs RTN at the same bits."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["bits"]), []).append(r)
    rows = []
    for (label, bits), rs in groups.items():
        values = [r["bits_per_byte"] for r in rs]
        rows.append({"method": label, "bits": bits, "n": len(values),
                     "calibrated": rs[0]["calibrated"], "mean": statistics.fmean(values),
                     "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "values": values})
    by_key = {(r["method"], r["bits"]): r for r in rows}
    for row in rows:
        rtn = by_key.get(("rtn", row["bits"]))
        if rtn is None or row["method"] == "rtn":
            continue
        row["vs_rtn"] = row["mean"] - rtn["mean"]  # negative: better than RTN
        # pooled sd over both groups' seeds (RTN's single run adds no degrees of freedom)
        dof = row["n"] - 1 + rtn["n"] - 1
        ss = (row["n"] - 1) * row["sd"] ** 2 + (rtn["n"] - 1) * rtn["sd"] ** 2
        row["pooled_sd"] = math.sqrt(ss / dof) if dof else 0.0
        row["vs_rtn_sd"] = row["vs_rtn"] / row["pooled_sd"] if row["pooled_sd"] else None
    order = {(m[0], m[2]): i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda r: order.get((r["method"], r["bits"]), len(order)))


def table(rows: list[dict], settings: dict) -> str:
    bf16 = next((r["mean"] for r in rows if r["method"] == "bf16"), None)
    lines = [f"Bits/byte on {Path(settings['eval_data']).name} (Gutenberg credits stripped"
             + (f", first {settings['eval_bytes']:,} bytes" if settings["eval_bytes"] else "")
             + f"), group size {GROUP_SIZE}, checkpoint {settings['checkpoint']}.", "",
             "| method | bits | seeds | bits/byte mean | sd | vs bf16 | vs RTN (same bits) "
             "| vs RTN / pooled sd |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sd = f"{r['sd']:.4f}" if r["calibrated"] else "0 (no calibration)"
        vs_bf16 = "" if bf16 is None else f"{100 * (r['mean'] / bf16 - 1):+.2f}%"
        vs_rtn = "" if "vs_rtn" not in r else f"{r['vs_rtn']:+.4f}"
        if "vs_rtn" not in r:
            in_sd = ""
        elif r["vs_rtn_sd"] is None:
            in_sd = "n/a (both deterministic)"
        else:
            in_sd = f"{r['vs_rtn_sd']:+.1f}"
        seeds = str(r["n"]) if r["calibrated"] else "-"
        lines.append(f"| {r['method']} | {r['bits']} | {seeds} | {r['mean']:.4f} | {sd} | "
                     f"{vs_bf16} | {vs_rtn} | {in_sd} |")
    lines += ["", "vs RTN: negative is better than RTN. The sd is over calibration seeds only "
              "(which windows of the calibration text are used), not over eval texts; RTN, "
              "bf16, int8 and nf4 are deterministic, so the pooled sd is the calibrated "
              "method's own."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT), help="plain checkpoint dir")
    p.add_argument("--out", required=True,
                   help="JSON Lines file of results: absent, or an earlier run of this "
                        "script with the same settings (its records are kept and skipped)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="calibration seeds for gptq and awq")
    p.add_argument("--eval_data", default=str(EVAL_TEXT), help="held-out text")
    p.add_argument("--eval_bytes", type=int, default=0,
                   help="score only the first this many bytes (0: all; for smoke runs)")
    p.add_argument("--eval_seq_len", type=int, default=512, help="eval window in tokens")
    p.add_argument("--calib_data", default=str(DEFAULT_CALIB_TEXT), help="calibration text")
    p.add_argument("--calib_samples", type=int, default=64, help="calibration windows")
    p.add_argument("--calib_seq_len", type=int, default=256, help="tokens per window")
    p.add_argument("--methods", nargs="+", default=None, choices=sorted({m[0] for m in METHODS}),
                   help="only these methods (default: all)")
    p.add_argument("--kernels", choices=["reference", "native"], default="reference",
                   help="reference: 4-bit layers on aten's bf16-activation kernel, so the "
                        "figure is the weights' error; native: on the native kernel "
                        "where this CPU runs it (int8 activations per group, what "
                        "fanformer-serve computes)")
    args = p.parse_args(argv)
    if args.kernels == "reference":
        os.environ[native_cpu.DISABLE_ENV] = "0"  # read once, when the first layer is built
    elif native_cpu.library() is None:
        print("quant_quality: error: --kernels native: the native kernel does not run "
              "here (see the log line above)", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        if args.eval_bytes < 0:
            raise BenchError(f"--eval_bytes must be >= 0, got {args.eval_bytes}")
        settings = settings_of(args)
        records = read_records(out, settings)
        done = {(r["method"], r["bits"], r["seed"]) for r in records}
        todo = [job for job in plan(args.seeds, args.methods)
                if (job[0], job[2], job[4]) not in done]
        text = eval_text(args) if todo else ""
        out.parent.mkdir(parents=True, exist_ok=True)
        for label, method, bits, extra, seed in todo:
            record = run_one(args, text, label, method, bits, extra, seed)
            records.append(record)
            with open(out, "a") as f:  # one line per result, written whole
                f.write(json.dumps({**record, "settings": settings}) + "\n")
            print(f"{label} {bits}-bit seed {seed}: {record['bits_per_byte']:.4f} bits/byte "
                  f"({record['seconds']} s)", file=sys.stderr, flush=True)
    except (BenchError, QuantError, CheckpointError, OSError) as e:  # e.g. --out a folder
        print(f"quant_quality: error: {e}", file=sys.stderr)
        return 2
    print(table(summarize(records), settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
