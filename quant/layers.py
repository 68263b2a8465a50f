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

  weight-only (small calls): our native kernel where this CPU runs it (quant/native_cpu.py:
      4-bit, and int8 on its AVX-512 build; int8 activations per weight group, rows apart
      by construction, fast up to ~64 rows, hence its own bound NATIVE_MAX_WORK); else
      bf16 activations times the stored weights, aten `_weight_int4pack_mm_for_cpu`
      (4-bit, groups of 32..256), `_weight_int8pack_mm` (int8) or bitsandbytes' nf4
      kernel. Their rows never mix (checked by tests/test_quant_layers.py); 2-4x faster
      than bf16 `F.linear` at 1-4 rows, but they slow down in proportion to the rows.
  w8a8 (big calls, and formats no weight-only kernel takes): each row quantized to int8
      on its own absmax grid, an integer GEMM with per-channel int8 weights (4-bit and
      nf4 weights requantized once), then the row and channel scales. Integer sums are
      exact, so a row's result cannot depend on the others by construction (the GEMM:
      quant/w8a8.py).
  where the CPU's int8 GEMM is slower than its fp32 one (`int8_gemm_fast`: no VNNI, so
      torch._int_mm is a plain loop, 26x slower than fp32 on an AVX2 AMD EPYC), layers with
      a weight-only kernel run it at every row count (the native AVX2 4-bit kernel at 64
      rows: 0.3-1.1 ms against 15-65 ms for w8a8 there), batch-invariant as well.
  other devices (CUDA): the readable reference, dequantized once into x's dtype and
      cached, then `F.linear`; `dequantize()` is also what the tests compare against.

The modules know their tensors and kernels; they know nothing about models or files.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch
import torch.nn.functional as F
from torch import nn

from quant import native_cpu
from quant.packing import unpack_awq, unpack_gptq
from quant.w8a8 import (
    activation_qmax,
    int8_gemm_fast,
    onednn_int8_fast,
    per_channel_int8,
    w8a8_kernel,
)

# The kernel policy, read per call, so benchmarks may change it between runs (never while
# serving: a request's numerics would change mid-stream); `weight_only_everywhere()` below
# sets both out of reach.
# Default: weight-only while rows x in_features x out_features is at most this, w8a8 above
# (the crossover measured with bench/bench_quant_kernels.py, docs/QUANTIZATION.md).
WEIGHT_ONLY_MAX_WORK = 1 << 21
# The same bound for layers on the native kernel's AVX-512 build (quant/native_cpu.py),
# which stays ahead of w8a8 on oneDNN's int8 GEMM up to about 64 rows of a 512 x 2048 layer
# and 4 rows of a 32k-vocabulary head (its AVX2 build keeps WEIGHT_ONLY_MAX_WORK) ...
NATIVE_MAX_WORK = 1 << 26
# ... and where w8a8 runs on torch._int_mm instead (oneDNN's int8 is slow on the CPU:
# `onednn_int8_fast`), on a par with it at 128 rows of 512 x 2048 and 2.6x faster at 512,
# while each w8a8 call's ~8 elementwise ops wake the sleeping OpenMP worker: a prefill step
# of 512 tokens stays on the native kernel (docs/QUANTIZATION.md "The native kernel")
NATIVE_MAX_WORK_VS_INT_MM = 1 << 29
# batch_invariant: layers with at least this many weights run w8a8 at every row count,
# smaller ones their weight-only kernel.
W8A8_MIN_WEIGHTS = 1 << 18
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
NF4_BLOCK = 64  # bitsandbytes' default blocksize for 4-bit


@contextlib.contextmanager
def weight_only_everywhere():
    """Within: every layer that has a weight-only kernel runs it at every row count (what
    benchmarks compare the default policy against); the policy is restored after."""
    global WEIGHT_ONLY_MAX_WORK, NATIVE_MAX_WORK, NATIVE_MAX_WORK_VS_INT_MM, W8A8_MIN_WEIGHTS
    saved = WEIGHT_ONLY_MAX_WORK, NATIVE_MAX_WORK, NATIVE_MAX_WORK_VS_INT_MM, W8A8_MIN_WEIGHTS
    WEIGHT_ONLY_MAX_WORK = NATIVE_MAX_WORK = NATIVE_MAX_WORK_VS_INT_MM = W8A8_MIN_WEIGHTS = 1 << 62
    try:
        yield
    finally:
        WEIGHT_ONLY_MAX_WORK, NATIVE_MAX_WORK, NATIVE_MAX_WORK_VS_INT_MM, W8A8_MIN_WEIGHTS = saved


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
        Weight-only (where the format has a kernel) while rows x weights is within
        `weight_only_budget()`; with batch_invariant, at every row count for layers on the
        native kernel or under W8A8_MIN_WEIGHTS weights; else w8a8. Where the CPU's int8
        GEMM is slower than fp32 (`int8_gemm_fast`), weight-only at every row count."""
        budget = self.weight_only_budget()
        weights = self.in_features * self.out_features
        if budget > 0 and not int8_gemm_fast():  # w8a8 would be the slow one at any size
            return "weight-only"
        if self.batch_invariant:  # the native kernel is fast enough at every row count
            weight_only = budget > 0 and (self.runs_native() or weights < W8A8_MIN_WEIGHTS)
        else:
            weight_only = rows * weights <= budget
        return "weight-only" if weight_only else "w8a8"

    def prepare(self, rows: int = 1) -> None:
        """Build now the CPU kernel a call of `rows` rows runs (repacking the weights, and
        the first time on a machine compiling the native kernel): the engine calls this at
        start, so that its first request does not pay for it."""
        self._kernel(self.kernel_name(rows))

    def runs_native(self) -> bool:
        """Whether the weight-only kernel is the native one (quant/native_cpu.py)."""
        return isinstance(self._kernel("weight-only"), native_cpu.NativeKernel)

    def weight_only_budget(self) -> int:
        """The most multiply-adds (rows x weights) a call may have and still run the
        weight-only kernel by default: 0 where there is none."""
        if self._kernel("weight-only") is None:
            return 0
        if self.runs_native() and native_cpu.full_build():
            return NATIVE_MAX_WORK if onednn_int8_fast() else NATIVE_MAX_WORK_VS_INT_MM
        return WEIGHT_ONLY_MAX_WORK  # the AVX2 build: where aten's would run, and faster

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

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (M, N) bf16 <- self(x) for x (M, K) bf16, the same bits: the native kernel
        writes into `out` where the forward would run it (server/native_step.py's phased
        step, without a temporary and its copy); anything else runs the forward. Inference
        only."""
        rows = x.shape[0]
        if x.device.type == "cpu" and self.bias is None and x.dtype == torch.bfloat16 and \
                out.dtype == torch.bfloat16 and self.kernel_name(rows) == "weight-only":
            kernel = self._kernel("weight-only")
            if isinstance(kernel, native_cpu.NativeKernel):
                kernel(self._prepare_input(x).to(torch.bfloat16).contiguous(), out=out)
                return
        out.copy_(self(x))

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
        group = native_cpu.activation_group(self.in_features)
        if native_cpu.full_build() and group and self.weight.device.type == "cpu":
            codes = native_cpu.int8_as_codes(self.weight, self.SCB / 127, group)
            return native_cpu.NativeKernel(*codes, group, bits=8)
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
        if native_cpu.library() is not None and codes.device.type == "cpu":
            return native_cpu.NativeKernel(codes, zeros, scales, gs, perm)
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
        has_kernel = getattr(lib.functional, "has_avx512bf16", None)
        if has_kernel is None or not has_kernel():
            # without AVX512-BF16, matmul_4bit reads the repacked weight as the plain
            # layout: garbage (relative error ~1.4, seen on an AVX2 AMD EPYC); bitsandbytes'
            # own Linear4bit repacks only where this holds
            return None
        try:
            weight, state = lib.functional._convert_weight_packed_for_cpu(
                self.weight.clone(), self._state())
        except (AttributeError, AssertionError, RuntimeError):
            return None  # an older bitsandbytes or a CPU without the kernel: w8a8
        return lambda x: lib.matmul_4bit(x, weight, quant_state=state)
