"""`fanformer-export`: rewrite a checkpoint directory in the current format.

Checkpoints written before format 2 (config fields nested under "model", no remote code)
load in this project but not in transformers. This command writes a copy that loads in both
(docs/HF.md); the weights and tokenizer files are copied byte for byte. It never writes into
an existing directory. The work is `fanformer.checkpoint.export_checkpoint`; this module
only parses arguments and reports errors.
"""

from __future__ import annotations

import argparse
import sys

from fanformer.checkpoint import CheckpointError, export_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fanformer-export",
        description="Write a checkpoint (any format version, plain or quantized) as a new "
                    "directory in the current format: a fanformer checkpoint that is also a "
                    "Hugging Face model folder (trust_remote_code).")
    p.add_argument("--checkpoint", required=True, help="the checkpoint directory to convert")
    p.add_argument("--output", required=True, help="a new directory to write (must not exist)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.output)
    except CheckpointError as e:
        print(f"fanformer-export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
