"""Quantization for the FANformer: GPTQ, AWQ, RTN, int8 and nf4 checkpoints, fast CPU layers.

`load_any_checkpoint` is what the server and `fanformer-generate` call: it loads a plain
checkpoint, or a quantized one (told apart by `quant_config.json`) built on the meta
device with its leaf linears swapped for quantized modules. This package imports
`fanformer` and never `server`.
"""

from quant.convert import load_any_checkpoint, load_quantized

__all__ = ["load_any_checkpoint", "load_quantized"]
