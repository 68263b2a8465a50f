"""FANformer vs a parameter-matched dense transformer: same data, tokens, schedule, tokenizer.

    python bench/fan_vs_transformer.py ../shared/data/train.txt --eval_file \
        fanformer/assets/eval.txt --tokenizer runs/demo/tokenizer.json --steps 1000

Runs `fanformer-train` once per model, one after the other (so they share the machine the
same way), then prints a Markdown table: parameters, training tokens, final eval
cross-entropy and bits/byte on the whole eval file, and the median training tokens/s
over the run's log lines. Every run gets identical training flags; only the model differs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# label -> fanformer-train model flags. The baselines are `transformer-tiny` (plain pre-norm
# Llama-style: no FAN, no CoLA, no gates) shrunk to the FANformer's parameter count, once
# by depth (4 layers) and once by FFN width (6 layers, as deep as `tiny`).
MODELS = {
    "fanformer": ("FANformer `tiny`", ["--preset", "tiny"]),
    "transformer-4l": ("`transformer-tiny`, 4 layers, d_ff 384",
                       ["--preset", "transformer-tiny", "--n_layers", "4", "--d_ff", "384"]),
    "transformer-6l": ("`transformer-tiny`, 6 layers, d_ff 176",
                       ["--preset", "transformer-tiny", "--d_ff", "176"]),
    "no-fan": ("ablation: `tiny` with `--p 0` (no FAN; fewer parameters)",
               ["--preset", "tiny", "--p", "0"]),
}


def read_run(out_dir: Path) -> dict:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    start = [r for r in rows if r.get("event") == "start"][-1]
    final = [r for r in rows if r.get("final")][-1]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return {"parameters": start["parameters"], "tokens": final["tokens"],
            "eval_cross_entropy": final["eval_cross_entropy"],
            "eval_bits_per_byte": final["eval_bits_per_byte"],
            "tokens_per_s": statistics.median(speeds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="+")
    parser.add_argument("--eval_file", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out_dir", default="runs/fan_vs_transformer")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    out = Path(args.out_dir)
    common = [*args.data, "--eval_file", args.eval_file, "--tokenizer", args.tokenizer,
              "--cache_dir", str(out / "cache"), "--seq_len", str(args.seq_len),
              "--batch_size", str(args.batch_size), "--max_steps", str(args.steps),
              "--warmup_steps", str(max(1, args.steps // 10)), "--lr", str(args.lr),
              "--precision", "bf16", "--eval_every", "0", "--save_every", str(args.steps),
              "--keep_last", "1", "--log_every", "10", "--seed", "0"]
    results = {}
    for name in args.models:
        label, flags = MODELS[name]
        run_dir = out / name
        if not (run_dir / "metrics.jsonl").is_file() or not any(
                '"final"' in line for line in (run_dir / "metrics.jsonl").open()):
            cmd = [sys.executable, "-m", "fanformer.train", *common, "--out_dir", str(run_dir),
                   *flags]
            print("running:", " ".join(cmd), file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
        results[label] = read_run(run_dir)
        print(label, results[label], file=sys.stderr, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("| model | parameters | training tokens | eval cross-entropy | eval bits/byte "
          "| training tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        print(f"| {label} | {r['parameters']:,} | {r['tokens']:,} | "
              f"{r['eval_cross_entropy']:.4f} | {r['eval_bits_per_byte']:.4f} | "
              f"{r['tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
