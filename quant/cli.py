"""`fanformer-quantize` (also `python -m quant.cli`): checkpoint in, quantized checkpoint out.

  fanformer-quantize --method gptq --checkpoint DIR --output DIR [--bits 4 --group_size 128]

Validates everything it can before working (method, bits, group size, that the input is
not already quantized, that the calibration text is long enough), quantizes, writes the
output directory atomically (nothing half-written on failure), reloads what it wrote to
measure eval bits/byte (by default on the whole eval text, Gutenberg credits stripped by
`fanformer.data.read_eval_text`; the report says how many tokens and bytes it scored), and
ends with a report also saved as `quant_report.json`. The quantized model is scored on the
weight-only kernels (`quant.layers.weight_only_everywhere`), so the figure is the weights'
own error: the default kernel policy would put the eval's long batches on w8a8 and add the
activations' int8 rounding, which a served request sees only in large batches.
Bad input is one line on stderr and exit status 2. It does not know how any method works.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from fanformer.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    atomic_directory,
    is_quantized,
    load_checkpoint,
)
from fanformer.data import EVAL_TEXT, bits_per_byte, read_eval_text
from fanformer.flags import FlagParser
from fanformer.outputs import OutputError, check_not_inside, check_output_dir, write_marker
from quant.calibration import DEFAULT_CALIB_TEXT, calibration_ids
from quant.config import METHODS, QuantConfig, QuantError
from quant.convert import block_linears, cast_float_tensors, load_quantized, write_quantized
from quant.layers import QuantLinear, weight_only_everywhere
from quant.rtn import effective_group_size

REPORT_FILE = "quant_report.json"
PROG = "fanformer-quantize"


def build_parser() -> FlagParser:
    p = FlagParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True,
                   help="plain (unquantized) checkpoint dir")
    p.add_argument("--output", "--output_dir", dest="output", required=True,
                   help="folder to write: absent, empty, or an earlier fanformer-quantize "
                        "output (replaced atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output even if it holds files this command did not write")
    p.add_argument("--bits", type=int, default=None,
                   help="weight bits: gptq/rtn 2/3/4/8, awq/nf4 4, int8 8 (default 4; 8 "
                        "for int8)")
    p.add_argument("--group_size", type=int, default=128,
                   help="inputs per scale group: 32, 64, 128, 256 or -1 (per row); layers "
                        "narrower than it use the largest halving that divides their width")
    p.add_argument("--asym", action="store_true", help="gptq/rtn: asymmetric grid")
    p.add_argument("--desc_act", action="store_true", help="gptq: act-order")
    p.add_argument("--static_groups", action="store_true",
                   help="gptq: group params fixed before act-order (monotonic g_idx)")
    p.add_argument("--damp_percent", type=float, default=0.01, help="gptq: Hessian dampening")
    p.add_argument("--no_true_sequential", action="store_true",
                   help="gptq: calibrate all linears of a block on unquantized inputs")
    p.add_argument("--no_clip", action="store_true", help="awq: skip the clipping search")
    p.add_argument("--lm_head", default="none", choices=["none", "int8", "int4"],
                   help="quantize the (untied) LM head too; int8 keeps quality, int4 is faster")
    p.add_argument("--calib_data", default=str(DEFAULT_CALIB_TEXT),
                   help="calibration text file (default: the shipped public-domain sample)")
    p.add_argument("--calib_samples", type=int, default=64, help="calibration windows")
    p.add_argument("--calib_seq_len", type=int, default=256, help="tokens per window")
    p.add_argument("--seed", type=int, default=0, help="calibration window seed")
    p.add_argument("--eval_data", default=str(EVAL_TEXT),
                   help="held-out text for bits/byte (default: the shipped eval text); "
                        "Project Gutenberg credit paragraphs are dropped")
    p.add_argument("--eval_tokens", type=int, default=None,
                   help="score at most this many eval tokens (default: all; 0: skip the "
                        "evaluation)")
    p.add_argument("--eval_seq_len", type=int, default=512, help="eval window length")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _read_text(path: str, what: str, read: Callable[[str], str] | None = None) -> str:
    """`read(path)` (default: the file as UTF-8), an unreadable file as one QuantError line."""
    try:
        return read(path) if read else Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise QuantError(f"cannot read the {what} {path} ({e.strerror})") from None


def _check_shapes(model, qc: QuantConfig) -> None:
    """Fail before any work when a layer's width cannot hold the requested packing."""
    if qc.method not in ("gptq", "rtn", "awq"):
        return
    per_word = 32 // qc.bits if 32 % qc.bits == 0 else 32
    for name in block_linears(model):
        k = model.get_submodule(name).in_features
        gs = effective_group_size(k, qc.group_size)
        if k % per_word or k % gs:
            raise QuantError(
                f"unsupported bits/group size: {name} has {k} inputs, which {qc.bits}-bit "
                f"packing (multiples of {per_word}) with groups of {gs} cannot hold")


def _tensor_bytes(model) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values() if not t.is_meta)


def _rss() -> int | None:
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss
    except ImportError:
        return None


def _evaluate(model, tokenizer, text: str, args) -> dict | None:
    """bits/byte, tokens and bytes scored on the first --eval_tokens (None: all) of text."""
    if args.eval_tokens == 0:
        return None
    seq_len = min(args.eval_seq_len, model.config.max_seq_len)
    return bits_per_byte(model, tokenizer, text, seq_len=seq_len, batch_size=4,
                         max_tokens=args.eval_tokens)


def quantize(args) -> dict:
    """Run one quantization; raises QuantError/CheckpointError for bad input."""
    method = args.method
    bits = args.bits if args.bits is not None else (8 if method == "int8" else 4)
    qc = QuantConfig(method=method, bits=bits, group_size=args.group_size, sym=not args.asym,
                     desc_act=args.desc_act, static_groups=args.static_groups,
                     damp_percent=args.damp_percent,
                     true_sequential=not args.no_true_sequential, lm_head=args.lm_head)
    if args.eval_tokens is not None and args.eval_tokens < 0:
        raise QuantError(f"--eval_tokens must be >= 0, got {args.eval_tokens}")
    source, output = Path(args.checkpoint), Path(args.output)
    if is_quantized(source):
        raise QuantError(f"{source} is already quantized (it has quant_config.json); "
                         "quantize the original checkpoint")
    if output.resolve() == source.resolve():
        raise QuantError("--output must be a different directory from --checkpoint")
    # --output is replaced as a whole: never one that holds the source
    check_not_inside(output, source, "--output", "--checkpoint")
    check_output_dir(output, PROG, "--output", args.overwrite, whole=True)
    model, tokenizer = load_checkpoint(source, dtype=torch.float32)  # the math runs in fp32
    _check_shapes(model, qc)
    ids = None
    if method in ("gptq", "awq"):
        ids = calibration_ids(tokenizer, _read_text(args.calib_data, "calibration text"),
                              args.calib_samples, args.calib_seq_len, args.seed)
    eval_text = (_read_text(args.eval_data, "eval text", read_eval_text)
                 if args.eval_tokens != 0 else "")
    torch.manual_seed(args.seed)
    memory_before, rss_before = _tensor_bytes(model), _rss()
    before = _evaluate(model, tokenizer, eval_text, args)

    start = time.perf_counter()
    _run_method(model, ids, qc, args)
    if qc.lm_head != "none":
        from quant.int8 import quantize_lm_head

        quantize_lm_head(model, qc.lm_head, qc.group_size)
    cast_float_tensors(model, torch.bfloat16)
    seconds = time.perf_counter() - start

    with atomic_directory(output) as tmp:
        write_quantized(tmp, model, tokenizer, qc, metadata={"quantized_from": str(source)})
        write_marker(tmp, PROG)
        del model
        qmodel, _ = load_quantized(tmp)  # measure what was written, as users will load it
        memory_after, rss_after = _tensor_bytes(qmodel), _rss()
        cast_float_tensors(qmodel, torch.float32)  # compare with `before` in fp32 compute
        with weight_only_everywhere():  # the weights' own error (module docstring)
            after = _evaluate(qmodel, tokenizer, eval_text, args)
            kernels = None if after is None else dict(Counter(
                m.kernel_name(1) for m in qmodel.modules()
                if isinstance(m, QuantLinear)))  # 3-bit and others: w8a8
        bpb_before = None if before is None else before["bits_per_byte"]
        bpb_after = None if after is None else after["bits_per_byte"]
        report = {
            "method": method, "bits": bits, "group_size": args.group_size,
            "lm_head": args.lm_head, "checkpoint": str(source), "output": str(output),
            "eval_bpb_before": bpb_before, "eval_bpb_after": bpb_after,
            "eval_bpb_change_percent": None if bpb_before is None else
            round(100 * (bpb_after / bpb_before - 1), 3),
            "eval_data": args.eval_data, "eval_tokens_cap": args.eval_tokens,
            # what was scored: predicted tokens and the UTF-8 bytes they stand for
            "eval_tokens_scored": None if after is None else after["tokens"],
            "eval_bytes_scored": None if after is None else after["bytes"],
            "eval_kernels": kernels,  # quantized layers scored on each kernel; None: no eval
            "eval_text_bytes": len(eval_text.encode("utf-8")) if eval_text else None,
            "size_bytes_before": (source / WEIGHTS_FILE).stat().st_size,
            "size_bytes_after": (tmp / WEIGHTS_FILE).stat().st_size,
            "model_memory_bytes_before": memory_before, "model_memory_bytes_after": memory_after,
            "rss_bytes_before": rss_before, "rss_bytes_after": rss_after,
            "seconds": round(seconds, 2),
            "calibration": None if ids is None else {
                "data": args.calib_data, "samples": args.calib_samples,
                "seq_len": args.calib_seq_len, "seed": args.seed},
        }
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _run_method(model, ids, qc: QuantConfig, args) -> None:
    from quant.int8 import quantize_int8, quantize_nf4, quantize_rtn

    names = block_linears(model)
    if qc.method == "gptq":
        from quant.gptq import quantize_gptq

        quantize_gptq(model, ids, qc, show_progress=not args.quiet)
    elif qc.method == "awq":
        from quant.awq import quantize_awq

        quantize_awq(model, ids, qc, clip=not args.no_clip, show_progress=not args.quiet)
    elif qc.method == "rtn":
        quantize_rtn(model, names, qc.bits, qc.group_size, qc.sym)
    elif qc.method == "int8":
        quantize_int8(model, names)
    else:
        quantize_nf4(model, names)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = quantize(args)
    except (QuantError, CheckpointError, OutputError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
