"""server/cpu_linear.py: a one-row bf16 linear through torch.mv gives the bits that row gets
inside a batch, many rows in fp32 chunks give F.linear's result to bf16 rounding, and the
engine's conversion leaves everything else as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from server.cpu_linear import FP32_GEMM_MIN_ROWS, CPULinear, use_cpu_linears
from server.engine import EngineConfig, LLMEngine
from server.sampling import SamplingParams
from tests.conftest import make_model

# (in, out) of the presets' bias-free linears: tiny's CoLA factors, tiny's full-rank layers
# (with --cola_rank 0), transformer-64m, 92m, heads
SHAPES = [(256, 64), (64, 768), (256, 218), (256, 512), (256, 768), (768, 256), (256, 8192),
          (512, 1024), (512, 2048), (2048, 512), (768, 3072), (3072, 768), (512, 32000)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("threads", [1, 2])
def test_one_row_equals_the_row_in_a_batch(shape, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        k, n = shape
        torch.manual_seed(k + n)
        layer = nn.Linear(k, n, bias=False).to(torch.bfloat16)
        batch = torch.randn(9, k, dtype=torch.bfloat16)  # (9, K)
        expected = F.linear(batch, layer.weight)  # (9, N)
        use_cpu_linears(layer)
        assert type(layer) is CPULinear
        for row in (0, 4, 8):
            alone = layer(batch[row: row + 1][None])  # (1, 1, K) -> (1, 1, N): the engine's shape
            assert alone.shape == (1, 1, n)
            assert torch.equal(alone[0, 0], expected[row])
        assert torch.equal(layer(batch), expected)  # more rows: F.linear as before
    finally:
        torch.set_num_threads(previous)


def test_only_bias_free_bf16_cpu_linears_change_and_the_state_dict_does_not():
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=True),
                          nn.Linear(8, 8, bias=False).double())
    model[0].to(torch.bfloat16)
    model[1].to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_cpu_linears(model) == 1
    assert [type(m) for m in model] == [CPULinear, nn.Linear, nn.Linear]
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert use_cpu_linears(model) == 0  # idempotent


def test_engine_tokens_do_not_change_with_the_gemv_path(tokenizer):
    """Greedy tokens of one stream with the engine's converted model == with F.linear."""
    prompt = [5, 17, 3, 99, 42, 7]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    tokens = {}
    for name in ("mv", "linear"):
        model = make_model()
        engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=4, dtype="bfloat16"))
        if name == "linear":  # undo the conversion: the plain nn.Linear path
            for module in engine.model.modules():
                if type(module) is CPULinear:
                    module.__class__ = nn.Linear
        else:
            assert any(type(m) is CPULinear for m in engine.model.modules())
        engine.add_request("r", prompt, params)
        out = []
        while engine.has_unfinished():
            for o in engine.step():
                out.extend(o.token_ids)
        tokens[name] = out
    assert len(tokens["mv"]) == 12
    assert tokens["mv"] == tokens["linear"]


@pytest.mark.parametrize("fp32_min_rows", [None, 16])
@pytest.mark.parametrize("rows", [1, 3, 17, 128])
def test_forward_into_writes_what_forward_returns(rows, fp32_min_rows):
    """The phased native step (server/native_step.py) writes a projection into its buffer:
    the same bits as the call, one row (in place through torch.mv), more (torch.mm's out=,
    or the fp32 chunks where bf16 GEMM is slow)."""
    torch.manual_seed(0)
    layer = nn.Linear(512, 1536, bias=False).to(torch.bfloat16)
    layer.__class__ = CPULinear
    layer.fp32_min_rows = fp32_min_rows
    x = torch.randn(rows, 512, dtype=torch.bfloat16)
    out = torch.full((rows, 1536), float("nan"), dtype=torch.bfloat16)
    with torch.inference_mode():  # as the engine runs it (mv's out= takes no autograd)
        layer.forward_into(x, out)
        assert torch.equal(out, layer(x))


@pytest.mark.parametrize("shape", [(512, 1536), (256, 2500), (2048, 512)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_fp32_chunks_give_the_fp32_product_rounded_once(shape):
    """Many rows where torch has no bf16 GEMM: fp32 sums over chunks of outputs (2500
    outputs of 256 inputs: two whole chunks and a short one), rounded to bf16 once, so
    within one bf16 rounding of the exact product; under autograd, F.linear as before."""
    k, n = shape
    torch.manual_seed(n)
    layer = nn.Linear(k, n, bias=False).to(torch.bfloat16)
    use_cpu_linears(layer)
    layer.fp32_min_rows = 16
    x = torch.randn(2, 20, k, dtype=torch.bfloat16)  # (B, T, K): 40 rows
    exact = x.double() @ layer.weight.double().T  # (2, 20, N)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (2, 20, n) and y.dtype == torch.bfloat16
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
    with torch.enable_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight))
    with torch.inference_mode():  # fewer rows than the bound: F.linear
        assert torch.equal(layer(x[0, :15]), F.linear(x[0, :15], layer.weight))


@pytest.mark.parametrize("slow,batch_invariant,expected", [
    (True, False, FP32_GEMM_MIN_ROWS), (True, True, None), (False, False, None)])
def test_fp32_rows_only_without_a_bf16_gemm_and_not_batch_invariant(
        monkeypatch, slow, batch_invariant, expected):
    import server.cpu_linear

    monkeypatch.setattr(server.cpu_linear, "bf16_gemm_is_slow", lambda: slow)
    layer = nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    assert use_cpu_linears(layer, batch_invariant) == 1
    assert layer.fp32_min_rows == expected
