"""Packing is lossless and matches the ecosystem's bit order; every quantized layer's fast
kernels agree with its readable reference (dequantize, then F.linear), never mix rows
(batch invariance, bitwise), create no tensor on the default device, and build once.
The reference and batch-invariance tests take the `device` fixture (CUDA where there is one:
there a layer runs its dequantize-once fallback)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from quant import layers as qlayers
from quant import native_cpu, w8a8
from quant.convert import awq_layer, gptq_layer
from quant.layers import Int8Linear, NF4Linear, bnb
from quant.packing import (
    dequantize_awq,
    dequantize_gptq,
    pack_awq,
    pack_gptq,
    pack_stream,
    unpack_awq,
    unpack_gptq,
    unpack_stream,
)
from quant.rtn import effective_group_size, rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [64, 55])  # 55: the output width is not a word multiple
def test_gptq_pack_unpack_is_lossless(bits, n):
    g = torch.Generator().manual_seed(bits)
    k, groups = 128, 4
    codes = torch.randint(0, 1 << bits, (k, n), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, 1 << bits, (groups, n), generator=g, dtype=torch.int32)
    scales = torch.rand(groups, n, generator=g).half().float()
    g_idx = torch.arange(k, dtype=torch.int32) // (k // groups)
    packed = pack_gptq(codes, zeros, scales, g_idx, bits)
    assert packed["qweight"].shape == (k * bits // 32, n)
    got_codes, got_zeros = unpack_gptq(packed["qweight"], packed["qzeros"], bits, n)
    assert torch.equal(got_codes, codes) and torch.equal(got_zeros, zeros)
    expected = ((codes - zeros[g_idx.long()]).float() * scales[g_idx.long()]).T
    assert torch.equal(dequantize_gptq(packed, bits, n), expected)


def test_gptq_bit_order_is_autogptq_v1():
    """Word r of qweight holds input rows 8r..8r+7, least-significant nibble first; the
    symmetric 4-bit zero point 8 is stored as 7, so every qzeros word is 0x77777777."""
    codes = torch.arange(16, dtype=torch.int32).repeat(2)[:, None].expand(32, 3).contiguous()
    zeros = torch.full((1, 8), 8, dtype=torch.int32)
    packed = pack_gptq(codes, zeros, torch.ones(1, 8), torch.zeros(32, dtype=torch.int32), 4)
    expected = sum(j << (4 * j) for j in range(8))
    assert int(packed["qweight"][0, 0]) == expected
    assert int(packed["qweight"][1, 0]) & 0xFFFFFFFF == sum((8 + j) << (4 * j) for j in range(8))
    assert int(packed["qzeros"][0, 0]) == 0x77777777


def test_three_bit_stream_straddles_words():
    codes = torch.zeros(32, 1, dtype=torch.int32)
    codes[10] = 0b101  # bits 30..32: two in word 0, one in word 1
    words = pack_stream(codes, 3)
    assert words.shape == (3, 1)
    assert int(words[0, 0]) & 0xFFFFFFFF == 0b01 << 30 and int(words[1, 0]) == 0b1
    assert torch.equal(unpack_stream(words, 3), codes)


def test_awq_pack_unpack_and_order():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 20), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (2, 20), generator=g, dtype=torch.int32)
    scales = torch.rand(2, 20, generator=g).half().float()
    packed = pack_awq(codes, zeros, scales)
    assert packed["qweight"].shape == (64, 3)
    got_codes, got_zeros = unpack_awq(packed["qweight"], packed["qzeros"], 20)
    assert torch.equal(got_codes, codes) and torch.equal(got_zeros, zeros)
    # nibble i of word 0 holds column AWQ_ORDER[i] = 0, 2, 4, 6, 1, 3, 5, 7
    word = int(packed["qweight"][0, 0]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == [int(codes[0, c]) for c in (0, 2, 4, 6, 1, 3, 5, 7)]
    gi = torch.arange(64) // 32
    assert torch.equal(dequantize_awq(packed, 32, 20),
                       ((codes - zeros[gi]).float() * scales[gi]).T)


def test_effective_group_size():
    assert effective_group_size(768, 128) == 128
    assert effective_group_size(192, 128) == 64  # CoLA rank 192
    assert effective_group_size(64, 128) == 64
    assert effective_group_size(48, 32) == 48  # no group of 32 fits: one group per row


def _weight(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def _layers():
    w = _weight(48, 256)
    bias = torch.randn(48) * 0.1
    q = rtn_quantize(w, 4, 64, sym=False)
    perm_q = rtn_quantize(w, 4, 64, sym=True)
    order = torch.randperm(256, generator=torch.Generator().manual_seed(1))
    perm_q.g_idx = perm_q.g_idx[torch.argsort(order)]  # a non-monotonic (act-order) g_idx
    yield "gptq", gptq_layer(q, bias, 4, 64)
    yield "gptq-act-order", gptq_layer(perm_q, None, 4, 64)
    yield "gptq-3bit", gptq_layer(rtn_quantize(w, 3, 64), bias, 3, 64)
    yield "awq", awq_layer(q, bias, 64, input_scale=torch.rand(256) + 0.5)
    yield "int8", Int8Linear.from_float(w, bias)
    yield "nf4", NF4Linear.from_float(_weight(64, 256), None)


@pytest.fixture(params=["weight-only", "native", "w8a8"])
def kernel(request, monkeypatch):
    """Run a test under each kernel family: the size threshold moved so that every layer
    that has a weight-only kernel uses it (aten's, or the native one where this CPU
    runs it), or so that every layer runs w8a8 (as a batch invariant layer does at any row
    count)."""
    if request.param == "native":
        if native_cpu.library() is None:
            pytest.skip("the native kernel does not run here")
    else:
        monkeypatch.setattr(native_cpu, "library", lambda: None)
    monkeypatch.setattr(qlayers, "W8A8_MIN_WEIGHTS", 0 if request.param == "w8a8" else 1 << 40)
    monkeypatch.setattr(qlayers, "int8_gemm_fast", lambda: True)  # w8a8 taken where asked
    monkeypatch.setattr(qlayers.QuantLinear, "batch_invariant", True)
    return request.param


@pytest.mark.parametrize("rows", [1, 3, 8, 33])
def test_kernels_match_reference(rows, kernel, device):
    for name, layer in _layers():
        layer = layer.to(device)
        x = torch.randn(rows, layer.in_features).to(device)
        reference = F.linear(x, layer.dequantize())
        if layer.bias is not None:
            reference = reference + layer.bias
        y = layer(x)
        err = float((y - reference).norm() / reference.norm())
        # bf16 activations (weight-only) or int8 activations (w8a8)
        assert err < 0.03, f"{name}, {kernel}, {rows} rows: relative error {err:.4f}"
        assert y.dtype == x.dtype and y.shape == (rows, layer.out_features)


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_forward_into_writes_what_forward_returns(rows, kernel):
    """The phased native step writes each projection into its buffer
    (`QuantLinear.forward_into`): the forward's bits, through the native kernel's `out=`
    where the forward runs it, else a copy (every kernel family, with and without a bias)."""
    for name, layer in _layers():
        x = torch.randn(rows, layer.in_features).to(torch.bfloat16)
        out = torch.full((rows, layer.out_features), float("nan"), dtype=torch.bfloat16)
        with torch.inference_mode():
            layer.forward_into(x, out)
            assert torch.equal(out, layer(x)), f"{name}, {kernel}, {rows} rows"


@pytest.mark.parametrize("onednn_fast", [True, False])
def test_kernel_follows_the_work_of_the_call_unless_batch_invariant(monkeypatch, onednn_fast):
    """By default a layer runs its weight-only kernel while rows x weights is at most
    WEIGHT_ONLY_MAX_WORK (on the native kernel's AVX-512 build: NATIVE_MAX_WORK where w8a8
    runs on oneDNN, NATIVE_MAX_WORK_VS_INT_MM where it runs on torch._int_mm) and w8a8 beyond
    (3-bit GPTQ has no weight-only kernel: always w8a8). With batch_invariant, one kernel
    at every row count: the native kernel, else weight-only under W8A8_MIN_WEIGHTS
    weights, w8a8 from there."""
    monkeypatch.setattr(qlayers, "int8_gemm_fast", lambda: True)  # (the next test: False)
    monkeypatch.setattr(qlayers, "onednn_int8_fast", lambda: onednn_fast)
    native_work = qlayers.NATIVE_MAX_WORK if onednn_fast else qlayers.NATIVE_MAX_WORK_VS_INT_MM
    head = gptq_layer(rtn_quantize(_weight(1024, 256), 4, 64), None, 4, 64)  # 2^18 weights
    native = native_cpu.library() is not None
    # no weight-only kernel: 3-bit GPTQ; nf4 where bitsandbytes' fused one does not run
    w8a8_only = {"gptq-3bit"} | ({"nf4"} if NF4Linear.from_float(
        _weight(64, 256), None)._weight_only_kernel() is None else set())
    wide = native_cpu.full_build()  # the AVX2 build keeps the 2M bound
    for name, layer in [*_layers(), ("head", head)]:
        weights = layer.in_features * layer.out_features
        # on the native kernel: 4-bit layers, and int8 ones on its AVX-512 build
        on_native = native and name in ("gptq", "gptq-act-order", "awq", "head") or \
            wide and name == "int8"
        budget = native_work if wide and on_native else qlayers.WEIGHT_ONLY_MAX_WORK
        assert layer.runs_native() == on_native, name
        edge = budget // weights  # the most rows weight-only takes
        got = [layer.kernel_name(r) for r in (1, edge, edge + 1, 1 << 22)]
        if name in w8a8_only:
            assert set(got) == {"w8a8"}, name
        else:
            assert got == ["weight-only"] * 2 + ["w8a8"] * 2, name
        monkeypatch.setattr(layer, "batch_invariant", True)
        invariant = "weight-only" if weights < qlayers.W8A8_MIN_WEIGHTS else "w8a8"
        if on_native:
            invariant = "weight-only"
        if name in w8a8_only:
            invariant = "w8a8"
        assert {layer.kernel_name(r) for r in (1, edge, edge + 1, 1 << 22)} == {invariant}, name
    assert head.kernel_name(1) == ("weight-only" if native else "w8a8")  # it is the big one
    policy = lambda: (qlayers.WEIGHT_ONLY_MAX_WORK, qlayers.NATIVE_MAX_WORK,
                      qlayers.NATIVE_MAX_WORK_VS_INT_MM, qlayers.W8A8_MIN_WEIGHTS)
    before = policy()
    with qlayers.weight_only_everywhere():
        assert head.kernel_name(4096) == "weight-only"
    assert policy() == before


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_weight_only_at_every_row_count_where_int8_gemm_is_slow(monkeypatch, batch_invariant):
    """Without a fast int8 GEMM (no VNNI: torch._int_mm is a plain loop), every layer with a
    weight-only kernel runs it at any row count; the others keep w8a8."""
    monkeypatch.setattr(qlayers, "int8_gemm_fast", lambda: False)
    for name, layer in _layers():
        monkeypatch.setattr(layer, "batch_invariant", batch_invariant)
        has_kernel = layer._kernel("weight-only") is not None
        expected = {"weight-only" if has_kernel else "w8a8"}
        assert {layer.kernel_name(r) for r in (1, 64, 1 << 22)} == expected, name


def _int4_head():
    """An int4 LM head as `--lm_head int4` writes it (symmetric RTN, groups of 64)."""
    return "int4-head", gptq_layer(rtn_quantize(_weight(96, 128, seed=3), 4, 64), None, 4, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_never_mix(kernel, dtype, device):
    """Row i of a batch is bitwise the row computed alone, at every batch size: what makes a
    request's tokens independent of the other requests in the engine's batch. Alone on one
    thread, batched on two, as the engine runs small and big steps."""
    x = (torch.randn(64, 256, generator=torch.Generator().manual_seed(5)) * 2).to(dtype)
    x[7] *= 100  # an outlier row must not change the others' activation grids
    x = x.to(device)
    threads = torch.get_num_threads()
    try:
        for name, layer in [*_layers(), _int4_head()]:
            layer = layer.to(device)
            xs = x[:, :layer.in_features]
            torch.set_num_threads(1)
            alone = torch.cat([layer(xs[i:i + 1]) for i in range(64)])
            torch.set_num_threads(2)
            for rows in (1, 3, 5, 16, 64):
                assert torch.equal(layer(xs[:rows]), alone[:rows]), (name, kernel, rows)
    finally:
        torch.set_num_threads(threads)


class _Ops(TorchDispatchMode):
    """Records the dtype and device of every tensor each op returns."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, torch.dtype, torch.device]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), t.dtype, t.device))
        return out


def test_unpacking_never_widens_to_int64():
    gptq = gptq_layer(rtn_quantize(_weight(48, 256), 4, 64, sym=False), None, 4, 64)
    gptq3 = gptq_layer(rtn_quantize(_weight(64, 256), 3, 64), None, 3, 64)
    awq = awq_layer(rtn_quantize(_weight(48, 256), 4, 64, sym=False), None, 64)
    with _Ops() as ops:
        unpack_gptq(gptq.qweight, gptq.qzeros, 4, 48)
        unpack_gptq(gptq3.qweight, gptq3.qzeros, 3, 64)
        unpack_awq(awq.qweight, awq.qzeros, 48)
    assert ops.outputs and not [o for o in ops.outputs if o[1] == torch.int64]


def test_no_tensor_is_created_on_the_default_device(kernel):
    """Kernels and unpacking create their tensors on the input's device: with the default
    device set to meta, a CPU layer still runs on CPU (a stray `torch.arange(k)` would
    land on meta and fail), and a layer moved to another device (meta standing in for
    CUDA here) runs there through its dequantize-once fallback."""
    layers = [*_layers(), _int4_head()]
    x = torch.randn(5, 256)
    expected = [layer(x[:, :layer.in_features]) for _, layer in layers]
    for (name, layer), want in zip(layers, expected):
        layer._kernels = {}
        with torch.device("meta"):
            got = layer(x[:, :layer.in_features])
        assert got.device.type == "cpu" and torch.equal(got, want), name
    for name, layer in layers:
        if name == "nf4":
            continue  # bitsandbytes' own dequantize has no meta implementation
        layer.to("meta")
        y = layer(torch.empty(3, layer.in_features, device="meta", dtype=torch.bfloat16))
        assert y.device.type == "meta" and y.shape == (3, layer.out_features), name


def test_the_fallback_dequantizes_once_and_rebuilds_when_buffers_change(monkeypatch):
    calls = []
    layer = gptq_layer(rtn_quantize(_weight(48, 256), 4, 64), None, 4, 64).to("meta")
    original = type(layer).dequantize
    monkeypatch.setattr(type(layer), "dequantize", lambda self: calls.append(1) or
                        original(self))
    x = torch.empty(2, 256, device="meta")
    layer(x)
    layer(x)
    assert len(calls) == 1
    layer.scales = layer.scales * 2  # a buffer replaced: the cache must not serve old weights
    layer(x)
    assert len(calls) == 2


def test_kernels_follow_replaced_buffers(kernel):
    """Reassigning a buffer (as AWQ's fold or a reload does) rebuilds the CPU kernels."""
    layer = Int8Linear.from_float(_weight(32, 64))
    x = torch.randn(3, 64)
    before = layer(x)
    layer.SCB = layer.SCB * 2
    assert torch.allclose(layer(x), 2 * before, rtol=0.02, atol=1e-3)


def test_int8_keys_are_bitsandbytes_compatible():
    """Linear8bitLt loads our int8 tensors (it needs `.to(device)` before load_state_dict)
    and computes the same outputs."""
    w = _weight(64, 128)
    ours = Int8Linear.from_float(w)
    theirs = bnb().nn.Linear8bitLt(128, 64, bias=False, has_fp16_weights=False, threshold=0.0)
    theirs = theirs.to("cpu")
    theirs.load_state_dict({"weight": ours.weight, "SCB": ours.SCB}, strict=False)
    x = torch.randn(2, 128)
    ref = F.linear(x, ours.dequantize())
    assert float((theirs(x).float() - ref).norm() / ref.norm()) < 0.03


def test_int8_kernel_survives_misaligned_weights():
    """safetensors may return tensors at 8-byte offsets, which crash aten's int8 kernel."""
    layer = Int8Linear.from_float(_weight(55, 64))
    buffer = torch.zeros(55 * 64 + 8, dtype=torch.int8)
    view = buffer[8:].view(55, 64)
    view.copy_(layer.weight)
    layer.weight = view
    x = torch.randn(1, 64)
    ref = F.linear(x, layer.dequantize())
    assert float((layer(x) - ref).norm() / ref.norm()) < 0.03


def test_casting_the_model_keeps_quantized_tensors_exact():
    """`model.to(torch.bfloat16)` (the engine's cast) moves but never rounds our tensors."""
    for name, layer in _layers():
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.to(torch.bfloat16)
        after = layer.state_dict()
        assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype
                   for k in before), name


def _gptq_reader(t, bits):
    """A GPTQ v1 reader written from the published layout (AutoGPTQ's torch fallback:
    a per-word shift table, a mask, zeros + 1), independent of quant.packing."""
    wf = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    zeros = ((t["qzeros"][:, :, None] >> wf[None, None, :]) & mask) + 1
    zeros = zeros.reshape(t["qzeros"].shape[0], -1)
    codes = ((t["qweight"][:, None, :] >> wf[None, :, None]) & mask)
    codes = codes.reshape(-1, t["qweight"].shape[1])
    g = t["g_idx"].long()
    n = t["scales"].shape[1]
    return (t["scales"].float()[g] * (codes - zeros[g][:, :n]).float()).T  # (N, K)


def _awq_reader(t, group_size):
    """An AutoAWQ GEMM reader from the published layout (unpack nibbles, then undo the
    interleave with the reverse order [0, 4, 1, 5, 2, 6, 3, 7])."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    reverse = [0, 4, 1, 5, 2, 6, 3, 7]

    def unpack(words):
        nibbles = (words[:, :, None] >> shifts) & 0xF  # (R, W, 8)
        return nibbles[:, :, reverse].reshape(words.shape[0], -1)

    codes, zeros = unpack(t["qweight"]), unpack(t["qzeros"])
    n = t["scales"].shape[1]
    g = torch.arange(codes.shape[0]) // group_size
    return (t["scales"].float()[g] * (codes[:, :n] - zeros[g][:, :n]).float()).T


@pytest.mark.parametrize("bits", [4, 8])
def test_an_independent_gptq_reader_sees_our_weights(bits):
    w = _weight(40, 256)
    q = rtn_quantize(w, bits, 64, sym=False)
    layer = gptq_layer(q, None, bits, 64)
    tensors = {k: getattr(layer, k) for k in ("qweight", "qzeros", "scales", "g_idx")}
    assert torch.equal(_gptq_reader(tensors, bits), layer.dequantize())
    assert torch.equal(layer.dequantize(), q.dequantize())  # scales were chosen in fp16


def test_an_independent_awq_reader_sees_our_weights():
    q = rtn_quantize(_weight(40, 256), 4, 64, sym=False)
    layer = awq_layer(q, None, 64)
    tensors = {k: getattr(layer, k) for k in ("qweight", "qzeros", "scales")}
    assert torch.equal(_awq_reader(tensors, 64), layer.dequantize())


@pytest.mark.parametrize("k,n", [(256, 48), (96, 50), (512, 640)])
def test_w8a8_kernel_gives_the_int_mm_bits_on_every_path(k, n):
    """Both GEMMs of the w8a8 kernel (oneDNN's prepacked int8 linear, tested wherever it is
    exact, even where it is too slow to be chosen; `torch._int_mm`) give `w8a8_linear`'s
    bits at every row count, in bf16 and fp32, on odd widths, with an outlier row."""
    g = torch.Generator().manual_seed(k + n)
    w8, scale = w8a8.per_channel_int8(torch.randn(n, k, generator=g))
    x = torch.randn(70, k, generator=g) * 3
    x[4] *= 1000
    expected = {dt: w8a8.w8a8_linear(x.to(dt), w8.T.contiguous(), scale)
                for dt in (torch.float32, torch.bfloat16)}
    fast = w8a8.w8a8_kernel(w8, scale, onednn=w8a8.onednn_int8_exact())  # even if slow
    portable = w8a8.w8a8_kernel(w8, scale, onednn=False)
    for kernel in (fast, portable):
        for dtype, want in expected.items():
            for rows in (1, 3, 16, 70):
                assert torch.equal(kernel(x[:rows].to(dtype)), want[:rows]), (dtype, rows)


def test_w8a8_takes_onednn_only_where_it_is_not_slower(monkeypatch, caplog):
    """A CPU where oneDNN's int8 linear is exact but runs its reference kernel (100x slower
    than `torch._int_mm` on an AMD EPYC) gets `_int_mm`, and the log says why; one where it
    is fast keeps it. The timings are stubbed: oneDNN's first, `_int_mm`'s second."""
    monkeypatch.setattr(w8a8, "onednn_int8_exact", lambda: True)
    monkeypatch.setattr(w8a8, "_onednn_int8_sums", lambda w8: lambda q: None)  # not run
    try:
        for onednn_s, chosen in ((0.100, False), (0.0009, True)):
            timings = iter([onednn_s, 0.0005])
            monkeypatch.setattr(w8a8, "_best_seconds", lambda fn, t=timings: next(t))
            w8a8.onednn_int8_fast.cache_clear()
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="quant.w8a8"):
                assert w8a8.onednn_int8_fast() is chosen
            assert ("slow kernel" in caplog.text) is not chosen
    finally:  # the real choice for the tests after this one
        w8a8.onednn_int8_fast.cache_clear()
