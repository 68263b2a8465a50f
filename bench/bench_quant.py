"""Quantization benchmark: decode speed of quantized models on CPU, and quality per method.

    nice -n 10 python bench/bench_quant.py speed --models demo fanformer-92m transformer-64m
    nice -n 10 python bench/bench_quant.py quality --checkpoint fanformer/assets/demo

`speed`: for each model (the demo checkpoint, or a preset with random weights) and each
variant (bf16; int8; 4-bit in the GPTQ layout, which rtn/gptq share, with the LM head in
bf16, int8 or int4; nf4), decode tokens/s through the serving engine (in-process, bf16,
greedy, ignore_eos) at each concurrency: C requests of a 16-token prompt, the clock runs
over the steps after the prefill step. Variants are interleaved round-robin over the
repeats so machine load hits all alike; medians are reported. Random-weight models get
the demo tokenizer and the embedding rows of tokens that are not whole text zeroed (as
bench_http.py does), so every generated token detokenizes.

`quality`: runs `fanformer-quantize` for every method on one checkpoint and tabulates its
reports, plus the bf16 model's bits/byte, and bits/byte with weight-only kernels on every
layer (no w8a8 on the big ones), to show what int8 activations cost.
Prints Markdown tables and writes JSON. Knows quant's public functions, not its internals.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fanformer.checkpoint import DEMO_CHECKPOINT, load_checkpoint, load_tokenizer  # noqa: E402
from fanformer.config import ModelConfig  # noqa: E402
from fanformer.data import EVAL_TEXT, bits_per_byte, read_eval_text  # noqa: E402
from fanformer.model import FANformer  # noqa: E402
from fanformer.tokenizer import Tokenizer  # noqa: E402
from quant import load_any_checkpoint  # noqa: E402
from quant.convert import block_linears, cast_float_tensors  # noqa: E402
from quant.int8 import quantize_int8, quantize_lm_head, quantize_nf4, quantize_rtn  # noqa: E402
from quant.layers import weight_only_everywhere  # noqa: E402

VARIANTS = {
    "bf16": lambda m: None,
    "int8": lambda m: (quantize_int8(m, block_linears(m)), quantize_lm_head(m, "int8")),
    "int4 g128, head bf16": lambda m: quantize_rtn(m, block_linears(m), 4, 128, True),
    "int4 g128, head int8": lambda m: (quantize_rtn(m, block_linears(m), 4, 128, True),
                                       quantize_lm_head(m, "int8")),
    "int4 g128, head int4": lambda m: (quantize_rtn(m, block_linears(m), 4, 128, True),
                                       quantize_lm_head(m, "int4")),
    "nf4, head int8": lambda m: (quantize_nf4(m, block_linears(m)),
                                 quantize_lm_head(m, "int8")),
}


# ---- speed ----
def _tokenizer() -> Tokenizer:
    for path in (DEMO_CHECKPOINT, ROOT / "runs" / "demo"):
        if (path / "tokenizer.json").is_file():
            return load_tokenizer(path)
    return Tokenizer.train_from_files([EVAL_TEXT], 8192, show_progress=False)


def _model(name: str) -> tuple[FANformer, Tokenizer]:
    if name == "demo":
        model, tokenizer = load_checkpoint(DEMO_CHECKPOINT)
        return model, tokenizer
    tokenizer = _tokenizer()
    config = ModelConfig.from_preset(name, dropout=0.0)
    torch.manual_seed(0)
    model = FANformer(config).eval()
    junk = [i for i in range(config.padded_vocab_size) if i >= tokenizer.vocab_size
            or i in tokenizer.special_ids or "\ufffd" in tokenizer.decode([i])
            or not tokenizer.decode([i])]
    with torch.no_grad():
        model.embed.weight[junk] = 0
    return model, tokenizer


def decode_tokens_per_s(model, tokenizer, concurrency: int, new_tokens: int) -> float:
    from server.engine import EngineConfig, LLMEngine
    from server.sampling import SamplingParams

    prompt = tokenizer.encode(EVAL_TEXT.read_text()[:4000])[100:116]
    engine = LLMEngine(model, tokenizer, EngineConfig(
        dtype="bfloat16", max_num_seqs=concurrency, enable_chunked_prefill=False,
        max_num_batched_tokens=max(512, concurrency * len(prompt))))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i in range(concurrency):
        engine.add_request(str(i), prompt, params)
    engine.step()  # the prefill step (and the first token of each request)
    tokens, start = 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(out.token_ids) for out in engine.step())
    return tokens / (time.perf_counter() - start)


def run_speed(args) -> dict:
    results: dict = {}
    for name in args.models:
        base, tokenizer = _model(name)
        models = {}
        for variant, apply in VARIANTS.items():
            model = copy.deepcopy(base)
            apply(model)
            cast_float_tensors(model, torch.bfloat16)
            models[variant] = model
        del base
        for concurrency in args.concurrency:
            runs = {v: [] for v in models}
            aten_only = []
            for model in models.values():  # build each layer's kernels (lazy) before timing
                decode_tokens_per_s(model, tokenizer, concurrency, 2)
            for _ in range(args.repeats):
                for variant, model in models.items():
                    runs[variant].append(decode_tokens_per_s(model, tokenizer, concurrency,
                                                             args.new_tokens))
                if concurrency > 4:  # what w8a8 on the big layers buys at batch size
                    with weight_only_everywhere():
                        aten_only.append(decode_tokens_per_s(
                            models["int4 g128, head int8"], tokenizer, concurrency,
                            args.new_tokens))
            row = {v: statistics.median(r) for v, r in runs.items()}
            if aten_only:
                row["int4 g128, head int8, aten kernels only"] = statistics.median(aten_only)
            results[f"{name} @ {concurrency}"] = row
            print(f"{name} @ {concurrency}: " + ", ".join(
                f"{v} {t:.1f}" for v, t in row.items()), flush=True)
    return results


def print_speed(results: dict) -> None:
    variants = list(dict.fromkeys(v for row in results.values() for v in row))
    print("\n| model @ concurrent requests | " + " | ".join(variants) + " |")
    print("|---" * (len(variants) + 1) + "|")
    for key, row in results.items():
        bf16 = row["bf16"]
        cells = [f"{row[v]:.1f}" + ("" if v == "bf16" else f" ({row[v] / bf16:.2f}x)")
                 if v in row else "" for v in variants]
        print(f"| {key} | " + " | ".join(cells) + " |")


# ---- quality ----
METHODS = [("int8", []), ("rtn", []), ("gptq", []), ("gptq", ["--desc_act"]), ("awq", []),
           ("nf4", [])]


def run_quality(args) -> dict:
    checkpoint = Path(args.checkpoint)
    text = read_eval_text(args.eval_data)  # as fanformer-quantize scores it
    results: dict = {}
    model, tokenizer = load_checkpoint(checkpoint)
    seq_len = min(512, model.config.max_seq_len)
    score = lambda m: bits_per_byte(m, tokenizer, text, seq_len, 4,  # noqa: E731
                                    args.eval_tokens)["bits_per_byte"]
    results["fp32"] = {"eval_bpb": score(model)}
    cast_float_tensors(model, torch.bfloat16)
    results["bf16"] = {"eval_bpb": score(model)}
    del model
    with tempfile.TemporaryDirectory() as tmp:
        for method, extra in METHODS:
            label = " ".join([method, *extra])
            out = Path(tmp) / label.replace(" ", "_")
            cmd = [sys.executable, "-m", "quant.cli", "--method", method, "--checkpoint",
                   str(checkpoint), "--output", str(out), "--eval_tokens",
                   str(args.eval_tokens), "--eval_data", args.eval_data, "--quiet", *extra]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                results[label] = {"error": done.stderr.strip()[-300:]}
                continue
            report = json.loads((out / "quant_report.json").read_text())
            with weight_only_everywhere():
                qmodel, _ = load_any_checkpoint(out)
                cast_float_tensors(qmodel, torch.float32)
                report["eval_bpb_weight_only_kernels"] = score(qmodel)
            results[label] = report
            print(label, {k: report[k] for k in ("eval_bpb_after", "size_bytes_after",
                                                 "seconds")}, flush=True)
    return results


def print_quality(results: dict) -> None:
    fp32 = results["fp32"]["eval_bpb"]
    print("\n| method | eval bits/byte | vs fp32 | bits/byte, weight-only kernels | "
          "checkpoint bytes | seconds |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        if "error" in r:
            print(f"| {label} | error: {r['error']} | | | | |")
            continue
        bpb = r.get("eval_bpb", r.get("eval_bpb_after"))
        print(f"| {label} | {bpb:.4f} | {100 * (bpb / fp32 - 1):+.2f}% | "
              f"{r.get('eval_bpb_weight_only_kernels', bpb):.4f} | "
              f"{r.get('size_bytes_after', '')} | {r.get('seconds', '')} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--models", nargs="+", default=["demo", "fanformer-92m", "transformer-64m"])
    s.add_argument("--concurrency", nargs="+", type=int, default=[1, 32])
    s.add_argument("--new_tokens", type=int, default=32)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--threads", type=int, default=2)
    q = sub.add_parser("quality")
    q.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    q.add_argument("--eval_data", default=str(EVAL_TEXT))
    q.add_argument("--eval_tokens", type=int, default=16384)
    for parser in (s, q):
        parser.add_argument("--out", default=None,
                            help="write the results as JSON here (a new file: never replaced)")
    args = p.parse_args()
    if args.out and Path(args.out).exists():  # refused before the run, not after it
        p.error(f"--out {args.out} exists; pass a new file")
    if args.command == "speed":
        torch.set_num_threads(args.threads)
        results = run_speed(args)
        print_speed(results)
    else:
        results = run_quality(args)
        print_quality(results)
    if args.out:
        with open(args.out, "x") as f:  # fails rather than replace a file made meanwhile
            f.write(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
