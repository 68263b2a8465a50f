"""Quantized checkpoints: save -> load gives identical logits, loading builds quantized
modules directly (no full-precision copy), `load_any_checkpoint` reads both kinds."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fanformer.checkpoint import CheckpointError, load_checkpoint
from quant import load_any_checkpoint
from quant.config import QuantConfig, QuantError
from quant.convert import block_linears, cast_float_tensors, save_quantized
from quant.int8 import quantize_int8, quantize_lm_head, quantize_nf4, quantize_rtn
from quant.layers import GPTQLinear, Int8Linear
from tests.conftest import make_model

IDS = torch.tensor([[1, 5, 9, 200, 3, 7, 11, 42], [4, 4, 8, 16, 300, 2, 1, 0]])


def _quantized(method: str, preset: str = "test", lm_head: str = "int8"):
    model = make_model(preset)
    names = block_linears(model)
    if method == "rtn":
        quantize_rtn(model, names, 4, 128, True)
    elif method == "int8":
        quantize_int8(model, names)
    else:
        quantize_nf4(model, names)
    if lm_head != "none":
        quantize_lm_head(model, lm_head)
    cast_float_tensors(model, torch.bfloat16)
    return model, QuantConfig(method=method, bits=8 if method == "int8" else 4,
                              lm_head=lm_head)


@pytest.mark.parametrize("method,preset,lm_head", [
    ("rtn", "test", "int8"), ("rtn", "transformer-test", "int4"), ("int8", "test", "none"),
    ("nf4", "transformer-test", "int8")])
def test_save_load_gives_identical_logits(tmp_path, tokenizer, method, preset, lm_head):
    model, qconfig = _quantized(method, preset, lm_head)
    with torch.no_grad():
        before = model(IDS)
        before_decode = model(IDS[:1, :1])
    save_quantized(tmp_path / "q", model, tokenizer, qconfig)
    loaded, tok = load_any_checkpoint(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(IDS), before)
        assert torch.equal(loaded(IDS[:1, :1]), before_decode)
    assert tok.vocab_size == tokenizer.vocab_size


def test_loading_builds_quantized_modules_without_float_weights(tmp_path, tokenizer):
    model, qconfig = _quantized("rtn")
    save_quantized(tmp_path / "q", model, tokenizer, qconfig)
    loaded, _ = load_any_checkpoint(tmp_path / "q")
    for name in block_linears(make_model()):
        layer = loaded.get_submodule(name)
        assert isinstance(layer, GPTQLinear) and layer.qweight.dtype == torch.int32
        assert not layer.qweight.is_meta
    assert isinstance(loaded.lm_head, Int8Linear)
    assert loaded.lm_head.weight.data_ptr() != loaded.embed.weight.data_ptr()  # untied
    assert not any(isinstance(m, nn.Linear) for m in loaded.modules())
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_quant_config_has_ecosystem_fields(tmp_path, tokenizer):
    model, qconfig = _quantized("rtn")
    save_quantized(tmp_path / "q", model, tokenizer, qconfig)
    body = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert body["quant_method"] == "gptq" and body["checkpoint_format"] == "gptq"
    assert body["bits"] == 4 and body["group_size"] == 128 and body["pack_dtype"] == "int32"
    # rank-16 CoLA factors cannot use groups of 128: GPTQModel's per-module override says so
    assert any(v["group_size"] == 16 for v in body["dynamic"].values())
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert QuantConfig.load(tmp_path / "q").layers.keys() == body["fanformer"]["layers"].keys()


def test_plain_checkpoint_loads_through_load_any(checkpoint_dir):
    plain, _ = load_checkpoint(checkpoint_dir)
    model, _ = load_any_checkpoint(checkpoint_dir)
    with torch.no_grad():
        assert torch.equal(model(IDS), plain(IDS))


def test_load_any_dtype_casts_only_float_parts(tmp_path, tokenizer):
    model, qconfig = _quantized("rtn")
    save_quantized(tmp_path / "q", model, tokenizer, qconfig)
    loaded, _ = load_any_checkpoint(tmp_path / "q", dtype=torch.float32)
    assert loaded.embed.weight.dtype == torch.float32
    assert loaded.blocks[0].attn.qkv.a.scales.dtype == torch.float16


def test_broken_quant_config_is_one_clear_error(tmp_path, tokenizer):
    model, qconfig = _quantized("int8")
    save_quantized(tmp_path / "q", model, tokenizer, qconfig)
    (tmp_path / "q" / "quant_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="quant_config.json"):
        load_any_checkpoint(tmp_path / "q")


def test_config_validation_messages():
    with pytest.raises(QuantError, match="unknown method 'gguf'"):
        QuantConfig(method="gguf")
    with pytest.raises(QuantError, match="--bits 5"):
        QuantConfig(method="gptq", bits=5)
    with pytest.raises(QuantError, match="--group_size"):
        QuantConfig(method="rtn", group_size=100)


def test_quant_modules_import_one_way():
    """No import cycle among quant's modules, counting imports inside functions too
    (convert <-> int8 was one: convert imported NF4Linear from int8 lazily)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "quant"
    edges = {}
    for path in package.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("quant."):
                deps.add(node.module.split(".")[1])
        edges[path.stem] = deps - {path.stem}

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for dep in edges.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    assert edges["convert"] and not [m for m in edges if m in reachable(m)]
