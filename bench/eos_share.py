"""Does the model learn to stop? The share of sampled completions that end with EOS.

    python bench/eos_share.py --checkpoint fanformer/assets/demo --out runs/eos_share.json

Prompts are sentence starts (the first --prompt_words words of sentences drawn, seeded,
from the held-out text, Gutenberg credits stripped by `fanformer.data.read_eval_text`).
Each is completed once through the serving engine (batched, as `fanformer-serve` runs
it) with the server's defaults for a request that sets none (temperature 1, top_p 1, no
top-k) and one seed per request, for up to --max_new_tokens tokens. A completion "ends"
when the model samples EOS before that limit. Reported: the share, its 95% Wilson score
interval, and the lengths; written as JSON to --out, which must not exist yet.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fanformer.checkpoint import DEMO_CHECKPOINT, CheckpointError  # noqa: E402
from fanformer.data import EVAL_TEXT, read_eval_text  # noqa: E402
from quant import load_any_checkpoint  # noqa: E402
from server.engine import EngineConfig, LLMEngine  # noqa: E402
from server.sampling import SamplingParams  # noqa: E402

# What a /v1/completions request that sets no sampling field gets (server/protocol.py).
SERVER_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


def sentence_starts(text: str, n: int, words: int, seed: int) -> list[str]:
    """n distinct sentence starts of `words` words, drawn without replacement (seeded)."""
    flat = re.sub(r"\s+", " ", text)
    sentences = [s.split(" ") for s in re.split(r"(?<=[.!?])\s+", flat)]
    starts = sorted({" ".join(s[:words]) for s in sentences if len(s) > words})
    if len(starts) < n:
        raise ValueError(f"the text holds {len(starts)} sentences longer than {words} words; "
                         f"fewer than the {n} asked for")
    rng = np.random.default_rng(seed)
    return [starts[i] for i in rng.choice(len(starts), size=n, replace=False)]


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial share k/n (95% at the default z)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def complete(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
             max_num_seqs: int) -> list[list[int]]:
    """Every prompt's generated token ids (EOS included when sampled), in prompt order."""
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=max_num_seqs,
                                                      max_queue_len=len(prompts)))
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=max_new_tokens, seed=seed + i, **SERVER_DEFAULTS)
        engine.add_request(str(i), tokenizer.encode(prompt), params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for step in engine.step():
            if step.error:
                raise RuntimeError(f"request {step.request_id} failed: {step.error}")
            out[step.request_id].extend(step.token_ids)
    return [out[str(i)] for i in range(len(prompts))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT),
                   help="checkpoint dir (plain or quantized)")
    p.add_argument("--out", required=True, help="JSON file to write; must not exist")
    p.add_argument("--n", type=int, default=200, help="completions")
    p.add_argument("--max_new_tokens", type=int, default=256, help="tokens per completion")
    p.add_argument("--eval_data", default=str(EVAL_TEXT), help="where the prompts come from")
    p.add_argument("--prompt_words", type=int, default=6, help="words per prompt")
    p.add_argument("--seed", type=int, default=0,
                   help="draws the prompts; request i samples with seed + i")
    p.add_argument("--max_num_seqs", type=int, default=64, help="engine batch (the server's)")
    p.add_argument("--examples", type=int, default=5, help="completions kept in the JSON")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists():
            raise ValueError(f"--out {out} exists; this script never overwrites, pass another")
        if args.n < 1 or args.max_new_tokens < 1 or args.prompt_words < 1:
            raise ValueError("--n, --max_new_tokens and --prompt_words must be positive")
        prompts = sentence_starts(read_eval_text(args.eval_data), args.n, args.prompt_words,
                                  args.seed)
        model, tokenizer = load_any_checkpoint(args.checkpoint)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "x"):  # claim the name before the long part
            pass
    except (ValueError, OSError, CheckpointError) as e:
        print(f"eos_share: error: {e}", file=sys.stderr)
        return 2
    try:
        with torch.inference_mode():
            generated = complete(model, tokenizer, prompts, args.max_new_tokens, args.seed,
                                 args.max_num_seqs)
    except BaseException:
        out.unlink(missing_ok=True)  # the empty file this run created
        raise
    eos = tokenizer.eos_id
    ended = [bool(ids) and ids[-1] == eos for ids in generated]
    lengths = [len(ids) for ids in generated]
    k = sum(ended)
    low, high = wilson(k, args.n)
    result = {
        "checkpoint": str(args.checkpoint), "n": args.n, "ended_with_eos": k,
        "share": k / args.n, "ci95_wilson": [low, high],
        "max_new_tokens": args.max_new_tokens, **SERVER_DEFAULTS, "seed": args.seed,
        "prompt_words": args.prompt_words, "eval_data": str(args.eval_data),
        "median_tokens_when_ended": statistics.median(
            n for n, e in zip(lengths, ended) if e) if k else None,
        "lengths": lengths,
        "examples": [{"prompt": pr, "completion": tokenizer.decode(ids), "ended": e}
                     for pr, ids, e in list(zip(prompts, generated, ended))[: args.examples]],
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{k}/{args.n} completions ended with EOS before {args.max_new_tokens} tokens: "
          f"{100 * k / args.n:.1f}% (95% interval {100 * low:.1f}-{100 * high:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
