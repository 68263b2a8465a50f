"""GPTQ and AWQ beat round-to-nearest where they should, the block driver calibrates on
quantized inputs, AWQ folds only where folding is exact, and runs are deterministic."""

from __future__ import annotations

import pytest
import torch

from quant.awq import fold_target, quantize_awq, search_clip, search_scale
from quant.calibration import block_stages, calibration_ids
from quant.config import QuantConfig, QuantError
from quant.convert import block_linears
from quant.gptq import gptq_quantize, hessian, quantize_gptq
from quant.int8 import quantize_rtn
from quant.layers import AWQLinear, GPTQLinear
from quant.rtn import rtn_quantize
from tests.conftest import FIXTURES, make_model


def _rel(y, ref):
    return float((y - ref).norm() / ref.norm())


def _correlated_inputs(n=4096, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + 0.2 * torch.eye(k)
    return torch.randn(n, k, generator=g) @ mix


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_gptq_beats_rtn_on_correlated_inputs(sym, act_order, static):
    x = _correlated_inputs()
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    ref = x @ w.T
    q = gptq_quantize(w, hessian(x), 4, 64, sym, 0.01, act_order, static)
    rtn = rtn_quantize(w, 4, 64, sym)
    assert _rel(x @ q.dequantize().T, ref) < 0.85 * _rel(x @ rtn.dequantize().T, ref)
    if act_order and not static:  # groups follow the Hessian order, so g_idx is permuted
        assert not torch.equal(q.g_idx, torch.arange(256, dtype=torch.int32) // 64)


def test_gptq_three_bit_beats_rtn():
    x = _correlated_inputs(k=128)
    w = torch.randn(64, 128) * 0.05
    ref = x @ w.T
    q = gptq_quantize(w, hessian(x), 3, 128)
    assert _rel(x @ q.dequantize().T, ref) < _rel(x @ rtn_quantize(w, 3, 128).dequantize().T, ref)


def test_awq_beats_rtn_on_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 256, generator=g)
    x[:, :8] *= 25  # a few channels with large activations, as in real LMs
    w = torch.randn(96, 256, generator=g) * 0.05
    ref = x @ w.T
    s = search_scale(x, [w], 4, [64])
    clipped = search_clip(x / s, w * s, 4, 64)
    awq = rtn_quantize(clipped, 4, 64, sym=False).dequantize() / s
    rtn = rtn_quantize(w, 4, 64, sym=False).dequantize()
    assert _rel(x @ awq.T, ref) < 0.85 * _rel(x @ rtn.T, ref)


def test_stages_follow_the_cola_dependency_order():
    model = make_model()
    x = torch.randn(1, 4, 64)
    stages = block_stages(model.blocks[1], x, torch.arange(4)[None], model.rope, 1)
    assert stages == [["attn.fan.proj"], ["attn.qkv.a"], ["attn.qkv.b"], ["attn.o.a"],
                      ["attn.o.b"], ["ffn.gate.a", "ffn.up.a"], ["ffn.gate.b"], ["ffn.up.b"],
                      ["ffn.down.a"], ["ffn.down.b"]]


def test_awq_folds_only_where_exact():
    model = make_model()  # HybridNorm: block 0 pre-norm, block 1 post-norm FFN
    b0, b1 = model.blocks
    assert fold_target(b0, ["attn.fan.proj"]) == ("norm", "attn_norm")
    assert fold_target(b1, ["attn.fan.proj"]) is None  # no norm before attention
    assert fold_target(b0, ["ffn.gate.a", "ffn.up.a"]) == ("norm", "ffn_norm")
    assert fold_target(b1, ["ffn.gate.a", "ffn.up.a"]) is None  # the norm is the residual
    assert fold_target(b0, ["attn.qkv.b"]) is None  # after CoLA's SiLU: never folded
    assert fold_target(b1, ["ffn.down.a"]) == ("rows", "ffn.up.b")


@pytest.fixture(scope="module")
def calib(tokenizer_module):
    text = (FIXTURES / "tiny.txt").read_text()
    return calibration_ids(tokenizer_module, text, 8, 32, seed=0)


@pytest.fixture(scope="module")
def tokenizer_module():
    from fanformer.tokenizer import Tokenizer

    return Tokenizer.train_from_files([FIXTURES / "tiny.txt"], 512, show_progress=False)


def _model_error(model, reference, ids):
    with torch.no_grad():
        return _rel(model(ids), reference(ids))


@pytest.mark.parametrize("preset", ["test", "transformer-test"])
def test_gptq_and_awq_models_beat_rtn(preset, calib):
    reference = make_model(preset)
    held_out = calib.flip(0)[:, :24]
    rtn = make_model(preset)
    quantize_rtn(rtn, block_linears(rtn), 4, 32, sym=False)
    rtn_error = _model_error(rtn, reference, held_out)
    gptq = make_model(preset)
    quantize_gptq(gptq, calib, QuantConfig("gptq", group_size=32, sym=False),
                  show_progress=False)
    awq = make_model(preset)
    quantize_awq(awq, calib, QuantConfig("awq", group_size=32), show_progress=False)
    assert _model_error(gptq, reference, held_out) < rtn_error
    assert _model_error(awq, reference, held_out) < rtn_error
    assert all(isinstance(gptq.get_submodule(n), GPTQLinear) for n in block_linears(reference))
    assert all(isinstance(awq.get_submodule(n), AWQLinear) for n in block_linears(reference))


def test_gptq_is_deterministic(calib):
    a, b = make_model(), make_model()
    for model in (a, b):
        quantize_gptq(model, calib, QuantConfig("gptq", group_size=32), show_progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))


def test_calibration_ids_are_seeded_and_checked(tokenizer_module):
    text = (FIXTURES / "tiny.txt").read_text()
    first = calibration_ids(tokenizer_module, text, 4, 16, seed=3)
    assert torch.equal(first, calibration_ids(tokenizer_module, text, 4, 16, seed=3))
    assert not torch.equal(first, calibration_ids(tokenizer_module, text, 4, 16, seed=4))
    with pytest.raises(QuantError, match="fewer than the 1000 samples"):
        calibration_ids(tokenizer_module, text[:2000], 1000, 64)


def test_quantizers_create_their_tensors_on_the_weights_device():
    """With the default device set to meta, quantizing CPU weights still happens on CPU and
    gives the same codes (a tensor made without `device=` would land on meta and fail)."""
    x = _correlated_inputs(n=512, k=128)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    h = hessian(x)

    def run():
        return (gptq_quantize(w, h, 4, 64, False, 0.01, True, False),
                gptq_quantize(w, h, 4, 64, True, 0.01, True, True),
                rtn_quantize(w, 4, 64, sym=False), search_clip(x, w, 4, 64))

    expected = run()
    with torch.device("meta"):
        got = run()
    for want, have in zip(expected[:3], got[:3]):
        for field in ("codes", "zeros", "scales", "g_idx"):
            assert torch.equal(getattr(want, field), getattr(have, field)), field
    assert torch.equal(expected[3], got[3])
