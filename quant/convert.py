"""Swap a model's leaf linears for quantized modules; save and load quantized checkpoints.

A quantized checkpoint is a normal checkpoint directory (config.json, model.safetensors,
tokenizer) plus `quant_config.json` listing every quantized module. Loading builds the
model on the meta device, swaps the listed leaf `nn.Linear`s for empty quantized modules
and loads the file with `assign=True`: no full-precision copy of a quantized weight ever
exists in memory. Quantizing the LM head unties it from the embedding (the embedding
stays in full precision). This module knows module names and files; the algorithms that
choose the codes live in rtn.py, gptq.py, awq.py and int8.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fanformer.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    atomic_directory,
    build_empty_model,
    check_state,
    finish_loading,
    is_quantized,
    load_checkpoint,
    load_tokenizer,
    read_config,
    read_tensors,
    unique_state_dict,
    write_config,
)
from fanformer.model import FANformer
from fanformer.tokenizer import Tokenizer
from quant.config import LayerSpec, QuantConfig, QuantError
from quant.layers import AWQLinear, GPTQLinear, Int8Linear, NF4Linear, QuantLinear
from quant.packing import pack_awq, pack_gptq
from quant.rtn import QuantizedWeight


def block_linears(model: nn.Module) -> list[str]:
    """Names of every leaf nn.Linear inside the blocks, in execution order per block."""
    return [name for name, mod in model.named_modules()
            if name.startswith("blocks.") and isinstance(mod, nn.Linear)]


def spec_of(layer: QuantLinear | nn.Module) -> LayerSpec:
    """The LayerSpec that rebuilds `layer` empty at load time."""
    bias = getattr(layer, "bias", None) is not None
    if isinstance(layer, GPTQLinear):
        return LayerSpec("gptq", layer.in_features, layer.out_features, bias, layer.bits,
                         layer.group_size)
    if isinstance(layer, AWQLinear):
        return LayerSpec("awq", layer.in_features, layer.out_features, bias, 4,
                         layer.group_size, layer.input_scale is not None)
    if isinstance(layer, Int8Linear):
        return LayerSpec("int8", layer.in_features, layer.out_features, bias, 8)
    if isinstance(layer, NF4Linear):
        return LayerSpec("nf4", layer.in_features, layer.out_features, bias, 4, 64)
    raise TypeError(f"not a quantized layer: {type(layer).__name__}")


def empty_layer(spec: LayerSpec, device="meta") -> nn.Module:
    """An empty quantized module of `spec`'s format, ready for `load_state_dict(assign=True)`."""
    if spec.format == "gptq":
        return GPTQLinear(spec.in_features, spec.out_features, spec.bias, spec.bits,
                          spec.group_size, device)
    if spec.format == "awq":
        return AWQLinear(spec.in_features, spec.out_features, spec.bias, spec.group_size,
                         spec.input_scale, device)
    if spec.format == "int8":
        return Int8Linear(spec.in_features, spec.out_features, spec.bias, device)
    return NF4Linear(spec.in_features, spec.out_features, spec.bias, device)


def gptq_layer(q: QuantizedWeight, bias: torch.Tensor | None, bits: int,
               group_size: int) -> GPTQLinear:
    """A GPTQLinear holding the GPTQ v1 packing of `q` (on `q`'s device)."""
    k, n = q.codes.shape
    layer = GPTQLinear(k, n, bias is not None, bits, group_size, device=q.codes.device)
    for name, tensor in pack_gptq(q.codes, q.zeros, q.scales, q.g_idx, bits).items():
        setattr(layer, name, tensor)
    if bias is not None:
        layer.bias = bias.detach().float().clone()
    return layer


def awq_layer(q: QuantizedWeight, bias: torch.Tensor | None, group_size: int,
              input_scale: torch.Tensor | None = None) -> AWQLinear:
    """An AWQLinear holding the AutoAWQ GEMM packing of `q`; `input_scale` multiplies x."""
    k, n = q.codes.shape
    layer = AWQLinear(k, n, bias is not None, group_size, input_scale is not None,
                      q.codes.device)
    for name, tensor in pack_awq(q.codes, q.zeros, q.scales).items():
        setattr(layer, name, tensor)
    if input_scale is not None:
        layer.input_scale = input_scale.detach().float().clone()
    if bias is not None:
        layer.bias = bias.detach().float().clone()
    return layer


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantized_layers(model: nn.Module) -> dict[str, LayerSpec]:
    """The LayerSpec of every quantized module in `model`, by name."""
    return {name: spec_of(mod) for name, mod in model.named_modules()
            if isinstance(mod, QuantLinear)}


def float_tensors_to(state: dict[str, torch.Tensor], quantized: set[str],
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Cast floating tensors of non-quantized modules to `dtype`; quantized modules' own
    tensors (fp16 scales, fp32 absmax) keep the dtype their format fixes."""
    return {k: v.to(dtype) if v.is_floating_point() and k.rpartition(".")[0] not in quantized
            else v for k, v in state.items()}


def cast_float_tensors(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters of non-quantized modules (embedding, norms, gates) to `dtype`,
    keeping ties (the unquantized LM head stays the embedding's weight)."""
    cast: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point():
                if id(param) not in cast:
                    cast[id(param)] = nn.Parameter(param.detach().to(dtype),
                                                   requires_grad=False)
                setattr(module, name, cast[id(param)])


def write_quantized(directory: Path, model: FANformer, tokenizer: Tokenizer,
                    qconfig: QuantConfig, metadata: dict | None = None) -> QuantConfig:
    """Write the checkpoint files into an existing (temporary) directory; returns the config
    with its per-module layout filled in. Tensors are written in the dtype they have.

    config.json carries `quantization_config` as transformers reads it (docs/QUANTIZATION.md,
    "Loading in transformers"): the blocks to swap for GPTQ, the modules to keep for AWQ.
    """
    qconfig = dataclasses.replace(qconfig, layers=quantized_layers(model))
    state = {k: v.detach().contiguous().cpu() for k, v in unique_state_dict(model).items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save(directory)
    hf_quant = {k: v for k, v in qconfig.to_json().items() if k != "fanformer"}
    head_quantized = "lm_head" in qconfig.layers
    if hf_quant["quant_method"] == "gptq":  # optimum finds no known block list by itself
        hf_quant["block_name_to_quantize"] = "blocks"
    elif hf_quant["quant_method"] == "awq":  # AWQ swaps every nn.Linear not listed here
        hf_quant["modules_to_not_convert"] = [] if head_quantized else ["lm_head"]
    write_config(directory, model.config, tokenizer, state["embed.weight"].dtype,
                 tie_word_embeddings=not head_quantized, metadata=metadata or {},
                 quantization_config=hf_quant)
    qconfig.save(directory)
    return qconfig


def save_quantized(directory: str | Path, model: FANformer, tokenizer: Tokenizer,
                   qconfig: QuantConfig, metadata: dict | None = None) -> Path:
    """Write a quantized checkpoint atomically (nothing half-written under `directory`)."""
    with atomic_directory(directory) as tmp:
        write_quantized(tmp, model, tokenizer, qconfig, metadata)
    return Path(directory)


def load_quantized(directory: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> tuple[FANformer, Tokenizer]:
    """Load a checkpoint with `quant_config.json`: meta model, swapped leaves, assign=True."""
    directory = Path(directory)
    config = read_config(directory)
    tokenizer = load_tokenizer(directory)
    qconfig = QuantConfig.load(directory)
    model = build_empty_model(config)
    for name, spec in qconfig.layers.items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{directory} quantizes {name}, which this model does not "
                                  "have") from None
        replace_module(model, name, empty_layer(spec))
    state = read_tensors(directory)
    check_state(model, state, directory / WEIGHTS_FILE)
    if dtype is not None:
        state = float_tensors_to(state, set(qconfig.layers), dtype)
    model.load_state_dict(state, strict=False, assign=True)
    finish_loading(model, device)
    return model, tokenizer


def load_any_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> tuple[FANformer, Tokenizer]:
    """Load a plain or a quantized checkpoint (told apart by `quant_config.json`)."""
    if is_quantized(path):
        try:
            return load_quantized(path, device, dtype)
        except QuantError as e:
            raise CheckpointError(str(e)) from None
    return load_checkpoint(path, device, dtype)
