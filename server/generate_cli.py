"""`fanformer-generate` on the engine: continue one prompt, streaming the text as it comes.

Same flags as the reference loop's CLI (fanformer/generate.py, whose parser and validation
we reuse) plus --dtype and HF's --max_new_tokens / --min_new_tokens; dashes or underscores
(fanformer/flags.py); plain and quantized checkpoints both load. The text goes to stdout
as the engine produces it; bad input is one line on stderr and a non-zero exit. This module
knows the command line; the work is server/engine.py's.
"""

from __future__ import annotations

import argparse
import sys

from fanformer.flags import FlagParser
from fanformer.generate import build_parser as reference_parser
from fanformer.generate import validate_sampling_args

PROG = "fanformer-generate"


def build_parser() -> FlagParser:
    """The reference CLI's flags, plus --dtype and HF transformers' names for two of them."""
    base = reference_parser()
    p = FlagParser(prog=PROG, description=base.description, parents=[base], add_help=False)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="weights, activations and KV cache dtype (auto = bfloat16)")
    p.add_argument("--max_new_tokens", dest="max_length", type=int, default=argparse.SUPPRESS,
                   help="the same as --max_length (HF transformers' name)")
    p.add_argument("--min_new_tokens", dest="min_length", type=int, default=argparse.SUPPRESS,
                   help="the same as --min_length (HF transformers' name)")
    p.add_argument("--model", dest="checkpoint", default=argparse.SUPPRESS,
                   help="the same as --checkpoint")
    return p


def main(argv: list[str] | None = None) -> int:
    from fanformer.checkpoint import DEMO_CHECKPOINT, CheckpointError
    from quant import load_any_checkpoint
    from server.engine import EngineConfig, EngineError, LLMEngine
    from server.sampling import SamplingParams

    args = build_parser().parse_args(argv)
    error = validate_sampling_args(args)
    if error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    path = args.checkpoint or DEMO_CHECKPOINT
    try:
        model, tokenizer = load_any_checkpoint(path, args.device)
        prompt = tokenizer.encode(args.prompt)
        params = SamplingParams(max_tokens=args.max_length, min_tokens=args.min_length,
                                temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed)
        config = EngineConfig(max_num_seqs=1, device=args.device, dtype=args.dtype,
                              max_model_len=min(model.config.max_seq_len,
                                                len(prompt) + args.max_length))
        engine = LLMEngine(model, tokenizer, config)
        engine.add_request("cli", prompt, params)
    except (CheckpointError, EngineError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # e.g. CUDA asked for but not available
        print(f"{PROG}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    sys.stdout.write(args.prompt)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finish_reason == "error":
                print(f"\n{PROG}: error: {out.error}", file=sys.stderr)
                return 1
            sys.stdout.write(out.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
