"""Training throughput (tokens/s) of presets, measured side by side in one run.

    python bench/bench_train.py --presets tiny fanformer-92m --precisions fp32 bf16
    python bench/bench_train.py --presets tiny "transformer-tiny:n_layers=4,d_ff=384"
    python bench/bench_train.py --presets tiny --precisions bf16 --attention plain document

Times full optimizer steps (forward, cross-entropy, backward, clip, AdamW) on random
tokens, after warm-up steps; reports the median over timed steps. Random tokens cost the
same as text, so no corpus is needed. `--attention document` trains with the
block-diagonal document mask of `fanformer-train --document_mask` (an EOS every 128
tokens; the mask costs the same wherever the EOS fall). Knows nothing about checkpoints
or data files.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from fanformer.config import ModelConfig
from fanformer.data import document_positions
from fanformer.model import FANformer
from fanformer.train import TrainArgs
from fanformer.trainer import make_optimizer


def parse_spec(spec: str) -> tuple[str, dict]:
    """"preset" or "preset:key=value,key=value" (model overrides, numbers parsed)."""
    preset, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = float(value) if "." in value else int(value)
    return preset, overrides


def bench(spec: str, precision: str, device: str, batch: int, seq_len: int, steps: int,
          warmup: int, vocab_size: int | None, compile: bool = False,
          attention: str = "plain") -> dict:
    preset, overrides = parse_spec(spec)
    if vocab_size:
        overrides["vocab_size"] = vocab_size
    config = ModelConfig.from_preset(preset, **overrides)
    torch.manual_seed(0)
    model = FANformer(config).to(device).train()
    optimizer = make_optimizer(model, TrainArgs())
    forward = torch.compile(model) if compile else model  # compiled in the warm-up steps
    bf16 = precision == "bf16"
    times = []
    for _ in range(warmup + steps):
        ids = torch.randint(1, config.vocab_size, (batch, seq_len + 1), device=device)
        if attention == "document":
            ids[:, 127::128] = 0  # EOS (token 0 here) every 128 tokens
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        positions = document_positions(ids[:, :-1], 0) if attention == "document" else None
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(ids[:, :-1], positions)  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times[warmup:])
    return {"model": spec, "parameters": model.num_parameters(), "precision": precision,
            "device": device, "compile": compile, "attention": attention, "batch": batch,
            "seq_len": seq_len,
            "steps": steps, "warmup_s": round(sum(times[:warmup]), 2),
            "median_step_s": round(median, 4), "tokens_per_s": round(batch * seq_len / median)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "fanformer-92m"],
                        help='presets, optionally with overrides: "transformer-tiny:n_layers=4"')
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="override the preset's vocabulary (e.g. the tokenizer's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (compiled during the warm-up steps)")
    parser.add_argument("--attention", nargs="+", default=["plain"],
                        choices=["plain", "document"],
                        help="plain causal, and/or the document mask of --document_mask")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for preset in args.presets:
        for precision in args.precisions:
            for attention in args.attention:
                print(json.dumps(bench(preset, precision, args.device, args.batch_size,
                                       args.seq_len, args.steps, args.warmup, args.vocab_size,
                                       args.compile, attention)), flush=True)


if __name__ == "__main__":
    main()
