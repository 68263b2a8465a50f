"""Drop-in quantized replacements for `nn.Linear`, batch-invariant on CPU.

Each module stores the on-disk tensors of its format as buffers (so `state_dict()` is the
checkpoint) and builds its kernel tensors lazily on the first forward, never persisting
them (the aten int4 layout is opaque and machine-specific); they are rebuilt whenever a
buffer is reassigned, loaded or moved.

Batch invariance: every kernel here keeps rows apart (row i of its output depends on row i
of x only). What can still make a request's tokens depend on the crowd is a layer that
switches kernels with the row count. By default a layer runs its weight-only kernel while
rows x weights (the call's multiply-adds) stays within WEIGHT_ONLY_MAX_WORK, where it is
faster, and w8a8 above: the weight-only kernels' time grows with that product, w8a8's is
nearly flat at these sizes. With `batch_invariant` (the engine sets it from
`--batch_invariant`) a layer runs one kernel at every row count, weight-only under
W8A8_MIN_WEIGHTS weights and w8a8 from there, and a request gives bitwise the same tokens
alone and in a crowd (numbers in docs/QUANTIZATION.md):

  weight-only (small calls): bf16 activations times the stored
      weights, aten `_weight_int4pack_mm_for_cpu` (4-bit, groups of 32..256),
      `_weight_int8pack_mm` (int8) or bitsandbytes' nf4 kernel. Their rows never mix
      (checked by tests/test_quant_layers.py); 2-4x faster than bf16 `F.linear` at 1-4
      rows, but they slow down in proportion to the rows.
  w8a8 (big calls, and formats no weight-only kernel takes): each row quantized to int8
      on its own absmax grid, an integer GEMM with per-channel int8 weights (4-bit and
      nf4 weights requantized once), then the row and channel scales. Integer sums are
      exact, so a row's result cannot depend on the others by construction. The GEMM is
      oneDNN's int8 linear on a weight prepacked at load where it gives exact sums here
      (AMX/VNNI; checked once), else `torch._int_mm`: the same bits either way.
  other devices (CUDA): the readable reference, dequantized once into x's dtype and
      cached, then `F.linear`; `dequantize()` is also what the tests compare against.

The modules know their tensors and kernels; they know nothing about models or files.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging

import torch
import torch.nn.functional as F
from torch import nn

from quant.packing import unpack_awq, unpack_gptq

# The kernel policy, read per call, so benchmarks may change it between runs (never while
# serving: a request's numerics would change mid-stream); `weight_only_everywhere()` below
# sets both out of reach.
# Default: weight-only while rows x in_features x out_features is at most this, w8a8 above
# (the crossover measured with bench/bench_quant_kernels.py, docs/QUANTIZATION.md).
WEIGHT_ONLY_MAX_WORK = 1 << 21
# batch_invariant: layers with at least this many weights run w8a8 at every row count,
# smaller ones their weight-only kernel.
W8A8_MIN_WEIGHTS = 1 << 18
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
NF4_BLOCK = 64  # bitsandbytes' default blocksize for 4-bit
# oneDNN's int8 linear gets rows in multiples of this: at 1-5 rows it picks its slow
# reference kernel for many shapes (ms instead of us; seen with ONEDNN_VERBOSE=1, torch
# 2.13), never at 6 or more in a grid of this repo's shapes; whole tiles also bound the
# number of shapes it JIT-compiles
ONEDNN_ROW_TILE = 16


@contextlib.contextmanager
def weight_only_everywhere():
    """Within: every layer that has a weight-only kernel runs it at every row count (what
    benchmarks compare the default policy against); the policy is restored after."""
    global WEIGHT_ONLY_MAX_WORK, W8A8_MIN_WEIGHTS
    saved = WEIGHT_ONLY_MAX_WORK, W8A8_MIN_WEIGHTS
    WEIGHT_ONLY_MAX_WORK = W8A8_MIN_WEIGHTS = 1 << 62
    try:
        yield
    finally:
        WEIGHT_ONLY_MAX_WORK, W8A8_MIN_WEIGHTS = saved


@functools.cache
def activation_qmax() -> int:
    """The int8 activation range: +-127, or +-63 (fbgemm's `reduce_range`) on CPUs without
    VNNI/AMX int8 dot products, whose u8 x s8 pair sums saturate int16 at full range."""
    return 127 if torch.cpu._is_vnni_supported() else 63


def quantize_rows(x: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> int8 codes (M, K) and fp32 scales (M, 1), each row on its own grid.

    The largest |x| of a row maps to x * (qmax / amax), within an ulp of qmax, so it
    rounds to qmax and no clamp is needed.
    """
    amax = x.abs().amax(-1, keepdim=True).float().clamp_(min=1e-30)  # (M, 1)
    q = (x * (qmax / amax)).round_().to(torch.int8)  # (M, K)
    return q, amax / qmax


def w8a8_linear(x: torch.Tensor, w8t: torch.Tensor, w_scale: torch.Tensor,
                qmax: int = 127) -> torch.Tensor:
    """x (M, K) times int8 weights w8t (K, N) with per-channel scales (N,): fp32 (M, N).

    `torch._int_mm` accumulates in int32, exactly, so the result of a row is the same
    whatever GEMM blocking the row count selects; the scaling is elementwise. The portable
    path, and the reference `w8a8_kernel`'s oneDNN path must equal bit for bit.
    """
    q, sx = quantize_rows(x, qmax)
    return torch._int_mm(q, w8t).float().mul_(sx).mul_(w_scale)


def _onednn_int8_sums(w8: torch.Tensor):
    """w8 (N, K) int8 -> a callable q (M, K) int8 -> (M, N) fp32 holding the exact int32
    sums q @ w8.T, through oneDNN's int8 linear on a weight prepacked once for this CPU
    (AMX or VNNI tiles). Scales of 1 and zero points of 0, so oneDNN only converts the sums
    to fp32, as `.float()` does; the real scales are applied after, in `w8a8_linear`'s order."""
    packed = torch.ops.onednn.qlinear_prepack(w8, None)
    ones = torch.ones(w8.shape[0], dtype=torch.float32, device=w8.device)
    zeros = torch.zeros(w8.shape[0], dtype=torch.long, device=w8.device)

    def sums(q: torch.Tensor) -> torch.Tensor:
        rows = q.shape[0]
        padded = -(-rows // ONEDNN_ROW_TILE) * ONEDNN_ROW_TILE
        if padded != rows:  # zero rows: exact sums of 0, and they never touch the others
            q = F.pad(q, (0, 0, 0, padded - rows))
        out = torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, packed, ones, zeros, None, 1.0, 0,
                                                 torch.float32, "none", [], "")
        return out[:rows]  # (M, N)
    return sums


@functools.cache
def onednn_int8_exact() -> bool:
    """Whether oneDNN's int8 linear runs here and gives `torch._int_mm`'s sums bit for bit
    (checked once on random codes at full range, several row counts). Where it does, it is
    2-4x faster than `_int_mm` at 16-64 rows on this repo's shapes (docs/QUANTIZATION.md)."""
    if not (hasattr(torch.ops.onednn, "qlinear_prepack") and torch.backends.mkldnn.is_available()):
        return False
    g = torch.Generator().manual_seed(0)
    w8 = torch.randint(-127, 128, (48, 256), generator=g, dtype=torch.int8, device="cpu")
    q = torch.randint(-activation_qmax(), activation_qmax() + 1, (17, 256), generator=g,
                      dtype=torch.int8, device="cpu")
    try:
        sums = _onednn_int8_sums(w8)
        return all(torch.equal(sums(q[:m]), torch._int_mm(q[:m], w8.T.contiguous()).float())
                   for m in (1, 5, 17))
    except RuntimeError:  # a torch built without oneDNN's int8 ops, or a CPU it rejects
        return False


def w8a8_kernel(w8: torch.Tensor, w_scale: torch.Tensor, qmax: int = 127):
    """A callable x (M, K) -> fp32 (M, N) computing `w8a8_linear` with the int8 weights w8
    (N, K) and per-channel scales w_scale (N,), on the fastest exact GEMM this CPU has."""
    w_scale = w_scale.float()
    if w8.device.type == "cpu" and onednn_int8_exact():
        sums = _onednn_int8_sums(w8.contiguous())

        def run(x: torch.Tensor) -> torch.Tensor:
            q, sx = quantize_rows(x, qmax)
            return sums(q).mul_(sx).mul_(w_scale)
        return run
    w8t = w8.T.contiguous()  # (K, N)
    return lambda x: w8a8_linear(x, w8t, w_scale, qmax)


def per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of w (N, K): codes (N, K) and fp32 scales (N,)."""
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _empty(shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


class QuantLinear(nn.Module):
    """Common forward: the layer's kernel for this many rows, the bias, x's dtype kept."""

    batch_invariant = False  # one kernel at every row count; LLMEngine sets it per layer

    def __init__(self, in_features: int, out_features: int, bias: bool, device="meta"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if bias:
            self.register_buffer("bias", _empty(out_features, torch.float32, device))
        else:
            self.bias = None
        self._kernels: dict[object, object] = {}

    # subclasses provide the reference dequantization and their weight-only kernel
    def dequantize(self) -> torch.Tensor:
        """The weight (N, K) in fp32 that this layer computes with."""
        raise NotImplementedError

    def stored_weight(self) -> torch.Tensor:
        """The weight (N, K) the kernels multiply `_prepare_input(x)` by; differs from
        `dequantize()` only when the layer has an explicit input scale (AWQ)."""
        return self.dequantize()

    def _weight_only_kernel(self):
        """A callable x_bf16 (M, K) -> (M, N), or None when no weight-only kernel fits."""
        return None

    def _int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel int8 weight (N, K) and fp32 scales (N,) for the w8a8 kernel."""
        return per_channel_int8(self.stored_weight())

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x  # AWQ layers with an explicit input scale multiply it in here

    def kernel_name(self, rows: int) -> str:
        """'weight-only' or 'w8a8': what this layer runs on CPU for an input of `rows` rows.
        Weight-only (where the format has a kernel) while rows x weights is at most
        WEIGHT_ONLY_MAX_WORK; with batch_invariant, at every row count for layers under
        W8A8_MIN_WEIGHTS weights; else w8a8."""
        weights = self.in_features * self.out_features
        if self.batch_invariant:
            weight_only = weights < W8A8_MIN_WEIGHTS
        else:
            weight_only = rows * weights <= WEIGHT_ONLY_MAX_WORK
        if weight_only and self._kernel("weight-only") is not None:
            return "weight-only"
        return "w8a8"

    # ---- kernels, built lazily and dropped whenever the buffers change ----
    def _kernel(self, name):
        if name not in self._kernels:
            if name == "weight-only":
                self._kernels[name] = self._weight_only_kernel()
            elif name == "w8a8":
                w8, scale = self._int8_weight()
                self._kernels[name] = w8a8_kernel(w8, scale, activation_qmax())
            else:  # (device, dtype): the reference weight, dequantized once
                self._kernels[name] = self.stored_weight().to(name[1])
        return self._kernels[name]

    def __setattr__(self, name, value):
        if name in self.__dict__.get("_buffers", ()):
            self.__dict__["_kernels"] = {}  # a buffer is replaced: rebuild from the new one
        super().__setattr__(name, value)

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernels = {}
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        """Follow device moves but never dtype casts: `model.to(torch.bfloat16)` (what the
        engine does) must not round fp16 scales or fp32 absmax to bf16."""
        before = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        if any(self._buffers[name] is not old for name, old in before.items()):
            self._kernels = {}  # moved: rebuild; a no-op `.to()` keeps the built kernels
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = self._prepare_input(x.reshape(-1, self.in_features))  # (M, K)
        if x.device.type != "cpu":
            y = F.linear(x2, self._kernel((x.device, x2.dtype)))
        elif self.kernel_name(x2.shape[0]) == "weight-only":
            y = self._kernel("weight-only")(x2.to(torch.bfloat16).contiguous())
        else:
            y = self._kernel("w8a8")(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)  # (..., N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Linear(QuantLinear):
    """Per-output-channel symmetric int8: `weight` int8 (N, K), `SCB` fp32 (N,) = absmax.

    The key names and meaning are bitsandbytes' (`SCB` is the row absmax; the scale is
    SCB / 127), so `bnb.nn.Linear8bitLt` can load these tensors too.
    """

    def __init__(self, in_features, out_features, bias=False, device="meta"):
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("weight", _empty((out_features, in_features), torch.int8, device))
        self.register_buffer("SCB", _empty(out_features, torch.float32, device))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        n, k = weight.shape
        layer = cls(k, n, bias is not None, device=weight.device)
        absmax = weight.detach().float().abs().amax(dim=1).clamp(min=1e-8)
        layer.weight = torch.round(weight.detach().float() * (127 / absmax[:, None])).to(
            torch.int8)
        layer.SCB = absmax
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    def dequantize(self):
        return self.weight.float() * (self.SCB / 127)[:, None]

    def _int8_weight(self):
        return self.weight, self.SCB / 127

    def _weight_only_kernel(self):
        weight = self.weight
        if weight.data_ptr() % 64 or not weight.is_contiguous():
            # safetensors can hand out tensors at 8-byte offsets; the aten int8 kernel
            # segfaults on those (measured), so it gets its own aligned copy
            weight = weight.contiguous().clone()
        scales = (self.SCB / 127).to(torch.bfloat16)
        return lambda x: torch.ops.aten._weight_int8pack_mm(x, weight, scales)


class _GroupedLinear(QuantLinear):
    """Shared runtime of the packed 4-bit formats: unpack to codes, repack for aten int4."""

    bits = 4
    group_size = 128

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """codes (K, N), zeros (G, N) int32, scales (G, N) fp32, g_idx (K,) long."""
        raise NotImplementedError

    def dequantize(self):
        codes, zeros, scales, g = self.unpacked()
        return ((codes - zeros[g]).float() * scales[g]).T.contiguous()  # (N, K)

    def _weight_only_kernel(self):
        gs, k, n = self.group_size, self.in_features, self.out_features
        if self.bits != 4 or gs not in INT4_GROUP_SIZES or k % gs:
            return None
        codes, zeros, scales, g = self.unpacked()
        contiguous = torch.arange(k, device=g.device) // gs
        perm = None
        if not torch.equal(g, contiguous):  # act-order: make groups contiguous
            perm = torch.argsort(g, stable=True)
            codes, g = codes[perm], g[perm]
            if not torch.equal(g, contiguous):
                return None  # groups of unequal size: no aten layout for that
        pad = -n % 16  # the int4 kernel needs N to be a multiple of 16
        codes = F.pad(codes.T, (0, 0, 0, pad)).contiguous()  # (N + pad, K)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        # tinygemm computes (q - 8) * scale + offset; ours is (q - zero) * scale
        offset = (8 - zeros.float()) * scales
        scale_zero = torch.stack([scales, offset], dim=-1)  # (G, N, 2)
        scale_zero = F.pad(scale_zero, (0, 0, 0, pad)).to(torch.bfloat16).contiguous()

        def run(x: torch.Tensor) -> torch.Tensor:
            if perm is not None:
                x = x[:, perm]
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, gs, scale_zero)
            return y[:, :n]

        return run


class GPTQLinear(_GroupedLinear):
    """GPTQ v1 tensors (`qweight`, `qzeros`, `scales`, `g_idx`); gptq and rtn write these."""

    def __init__(self, in_features, out_features, bias=False, bits=4, group_size=128,
                 device="meta"):
        super().__init__(in_features, out_features, bias, device)
        self.bits, self.group_size = bits, group_size
        groups = -(-in_features // group_size)
        per_word = 32 // bits if 32 % bits == 0 else 32
        zero_words = -(-out_features // per_word) * per_word * bits // 32
        self.register_buffer("qweight", _empty((in_features * bits // 32, out_features),
                                               torch.int32, device))
        self.register_buffer("qzeros", _empty((groups, zero_words), torch.int32, device))
        self.register_buffer("scales", _empty((groups, out_features), torch.float16, device))
        self.register_buffer("g_idx", _empty(in_features, torch.int32, device))

    def unpacked(self):
        codes, zeros = unpack_gptq(self.qweight, self.qzeros, self.bits, self.out_features)
        return codes, zeros, self.scales.float(), self.g_idx.long()

    def extra_repr(self):
        return super().extra_repr() + f", bits={self.bits}, group_size={self.group_size}"


class AWQLinear(_GroupedLinear):
    """AutoAWQ GEMM tensors (`qweight`, `qzeros`, `scales`), 4-bit; plus `input_scale` (K,)
    when AWQ's per-channel scale could not be folded into the op before this layer: the
    layer then computes Q(W * s) (x / s), and `input_scale` holds 1 / s."""

    def __init__(self, in_features, out_features, bias=False, group_size=128,
                 input_scale=False, device="meta"):
        super().__init__(in_features, out_features, bias, device)
        self.group_size = group_size
        groups, words = in_features // group_size, -(-out_features // 8)
        self.register_buffer("qweight", _empty((in_features, words), torch.int32, device))
        self.register_buffer("qzeros", _empty((groups, words), torch.int32, device))
        self.register_buffer("scales", _empty((groups, out_features), torch.float16, device))
        if input_scale:
            self.register_buffer("input_scale", _empty(in_features, torch.float32, device))
        else:
            self.input_scale = None

    def unpacked(self):
        codes, zeros = unpack_awq(self.qweight, self.qzeros, self.out_features)
        g = torch.arange(self.in_features, device=codes.device) // self.group_size
        return codes, zeros, self.scales.float(), g

    def stored_weight(self):
        return super().dequantize()  # Q(W * s), applied to x / s

    def dequantize(self):
        w = self.stored_weight()
        return w if self.input_scale is None else w * self.input_scale.float()

    def _prepare_input(self, x):
        return x if self.input_scale is None else x * self.input_scale.to(x.dtype)

    def extra_repr(self):
        return super().extra_repr() + f", group_size={self.group_size}"


def bnb():
    """Import bitsandbytes quietly (on CPU it logs a harmless 'kernels' hub warning)."""
    with contextlib.redirect_stderr(io.StringIO()):
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes
        import bitsandbytes.functional
    return bitsandbytes


class NF4Linear(QuantLinear):
    """bitsandbytes 4-bit NormalFloat: `weight` uint8 (N*K/2, 1), `absmax` fp32 per block of
    64 weights (row-major), `quant_map` fp32 (16,) the NF4 code book. bitsandbytes is
    imported only when such a layer is built or run."""

    def __init__(self, in_features, out_features, bias=False, device="meta"):
        super().__init__(in_features, out_features, bias, device)
        numel = in_features * out_features
        self.register_buffer("weight", _empty((numel // 2, 1), torch.uint8, device))
        self.register_buffer("absmax", _empty(-(-numel // NF4_BLOCK), torch.float32, device))
        self.register_buffer("quant_map", _empty(16, torch.float32, device))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> NF4Linear:
        n, k = weight.shape
        packed, state = bnb().functional.quantize_4bit(
            weight.detach().to(torch.bfloat16).contiguous(), blocksize=NF4_BLOCK,
            quant_type="nf4")
        layer = cls(k, n, bias is not None, device=weight.device)
        layer.weight, layer.absmax, layer.quant_map = packed, state.absmax.float(), state.code
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    def _state(self):
        return bnb().functional.QuantState(
            absmax=self.absmax, shape=torch.Size([self.out_features, self.in_features]),
            code=self.quant_map, blocksize=NF4_BLOCK, quant_type="nf4", dtype=torch.bfloat16)

    def dequantize(self):
        return bnb().functional.dequantize_4bit(self.weight, self._state()).float()

    def _weight_only_kernel(self):
        """bitsandbytes' fused AVX512-BF16 nf4 kernel, on its repacked CPU layout."""
        lib = bnb()
        if self.out_features % 32 or self.in_features % 2:
            return None
        try:
            weight, state = lib.functional._convert_weight_packed_for_cpu(
                self.weight.clone(), self._state())
        except (AttributeError, AssertionError, RuntimeError):
            return None  # an older bitsandbytes or a CPU without the kernel: w8a8
        return lambda x: lib.matmul_4bit(x, weight, quant_state=state)
