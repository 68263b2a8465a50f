"""The native CPU kernels (quant/native_cpu.c, quant/native_step.c, their shared
quant/native_kernels.h): build, load, pack, call. A quantized linear for 4- and 8-bit
weights (`NativeKernel`), decode attention over the engine's paged KV cache (`PagedDecode`,
which server/kv_cache.py calls), and the whole decode step that server/native_step.py
describes and calls (`fanformer_decode_step`, `fanformer_block_phase`).

Why our own kernel: at 1-16 rows a 4-bit linear is memory- and overhead-bound, and aten's
`_weight_int4pack_mm_for_cpu` (bf16 math, one weight decode per row) or the w8a8 path (a
dozen aten ops a call: quantize, GEMM, two scalings, casts) leave most of a decode step to
per-op overhead (docs/ENGINE.md). This one does the whole linear in one OpenMP region:
each row quantized to int8 per weight group, VPDPBUSD dot products on the 4-bit codes,
the scales, the output in x's dtype. Its rows never mix, so it is batch-invariant at every
row count.

The C source ships with the package and is compiled on first use with the system's C
compiler into a per-user cache (`$FANFORMER_KERNEL_CACHE`, else
`~/.cache/fanformer/kernels`), keyed by the source, the compiler and the flags; the file is
written atomically, so concurrent servers share it. Builds made beforehand of this very
source (`python -m quant.native_cpu --prebuild DIR`, every ISA: the Docker image's builder
stage) are loaded from `$FANFORMER_PREBUILT_KERNELS` instead. It needs x86-64 Linux with
AVX2 and FMA (the AVX-512 VNNI build where the CPU has it); elsewhere, without either, or with
`FANFORMER_NATIVE_KERNELS=0`, `library()` returns None and the layers keep aten's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from fanformer.checkpoint import current_umask

log = logging.getLogger(__name__)

# compiled together into one library; the header is hashed into the key with them
SOURCES = [Path(__file__).with_name(name)
           for name in ("native_cpu.c", "native_step.c", "native_sample.c")]
HEADER = Path(__file__).with_name("native_kernels.h")
COMMON_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared"]
# the builds, best first: compiler flags, and the /proc/cpuinfo flags a CPU needs for them
ISAS = {
    "avx512": (["-DFANFORMER_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
                "-mavx512vnni", "-mfma"], {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
    "avx2": (["-mavx2", "-mfma"], {"avx2", "fma"}),
}
BLOCK = 16  # output channels per block (the C file's BLOCK)
# Calls this small run on one thread: waking torch's second OpenMP thread (it sleeps under
# OMP_WAIT_POLICY=PASSIVE, which fanformer-serve sets) costs more than it saves on layers of
# up to 256 KiB of weights at up to 8M multiply-adds (docs/QUANTIZATION.md, "Threads")
SINGLE_THREAD_MAX_BYTES = 1 << 18
SINGLE_THREAD_MAX_WORK = 1 << 23
DISABLE_ENV = "FANFORMER_NATIVE_KERNELS"
ISA_ENV = "FANFORMER_NATIVE_ISA"  # force a build ("avx2" on an AVX-512 CPU: for tests)
CACHE_ENV = "FANFORMER_KERNEL_CACHE"
PREBUILT_ENV = "FANFORMER_PREBUILT_KERNELS"  # a folder of `prebuild`'s output


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's /proc/cpuinfo flags (read once: they do not change while we run)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "fanformer" / "kernels"


def _file_name(isa: str, compiler_version: str) -> str:
    """The build's file name: keyed by the sources, the flags and the compiler's version
    ("" for a prebuilt one, which is looked up without a compiler at hand)."""
    texts = [p.read_text() for p in (*SOURCES, HEADER)]
    key = hashlib.sha256("\0".join([*texts, compiler_version, *COMMON_FLAGS, *ISAS[isa][0]])
                         .encode())
    return f"native_cpu-{isa}-{key.hexdigest()[:16]}.so"


def _compile(compiler: str, isa: str, target: Path | None = None) -> Path:
    """The shared library for this source, compiler and ISA (at `target`, else in the
    cache); built once per key, written atomically."""
    flags = [*COMMON_FLAGS, *ISAS[isa][0]]
    if target is None:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 check=True).stdout
        target = cache_dir() / _file_name(isa, version)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    start = time.perf_counter()
    try:
        subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", tmp, "-lm"],
                       capture_output=True, text=True, check=True)
        os.chmod(tmp, 0o777 & ~current_umask())  # what the compiler's own output would get
        os.replace(tmp, target)  # atomic: a concurrent build leaves one complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("native CPU kernel: built %s in %.1f s", target, time.perf_counter() - start)
    return target


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def prebuild(folder: Path) -> list[Path]:
    """Every ISA's build of this source into `folder`, for a machine without a compiler
    ($FANFORMER_PREBUILT_KERNELS there); the CPU here need not run them."""
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler (gcc) found")
    return [_compile(compiler, isa, Path(folder) / _file_name(isa, "")) for isa in ISAS]


def _prebuilt(isa: str) -> Path | None:
    folder = os.environ.get(PREBUILT_ENV)
    path = Path(folder) / _file_name(isa, "") if folder else None
    return path if path is not None and path.is_file() else None


def best_isa() -> str | None:
    """The build this CPU runs best ($FANFORMER_NATIVE_ISA overrides), or None."""
    flags = cpu_flags()
    forced = os.environ.get(ISA_ENV)
    usable = [isa for isa, (_, needed) in ISAS.items() if needed <= flags]
    if forced:
        return forced if forced in usable else None
    return usable[0] if usable else None


@functools.cache
def load(isa: str) -> ctypes.CDLL:
    """Build (once per cache) and load the `isa` build; raises OSError or
    CalledProcessError when that fails."""
    compiler, prebuilt = _compiler(), _prebuilt(isa)
    if compiler is None and prebuilt is None:
        raise OSError("no C compiler (gcc) found" + (
            f", and no build of this source in {PREBUILT_ENV}={os.environ[PREBUILT_ENV]}"
            if os.environ.get(PREBUILT_ENV) else ""))
    lib = ctypes.CDLL(str(prebuilt or _compile(compiler, isa)))
    lib.isa = isa
    fn = lib.fanformer_wq_linear
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    att = lib.fanformer_paged_decode
    att.restype = ctypes.c_int
    att.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                    ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    dense = lib.fanformer_bf16_linear
    dense.restype = ctypes.c_int
    dense.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                      ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    step = lib.fanformer_decode_step  # its structs: server/native_step.py
    step.restype = ctypes.c_int
    step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    draw = lib.fanformer_sample_rows
    draw.restype = ctypes.c_int
    draw.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                     ctypes.c_int64, *[ctypes.c_void_p] * 6, ctypes.c_int]
    phase = lib.fanformer_block_phase
    phase.restype = ctypes.c_int
    phase.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                      ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel library for this machine, or None where it cannot run here (the reason
    is logged once)."""
    isa = best_isa()
    if os.environ.get(DISABLE_ENV, "1") == "0":
        why = f"{DISABLE_ENV}=0"
    elif platform.system() != "Linux" or platform.machine() != "x86_64":
        why = "not x86-64 Linux"
    elif isa is None:
        why = ("the CPU lacks AVX2/FMA" if not os.environ.get(ISA_ENV)
               else f"{ISA_ENV}={os.environ[ISA_ENV]} is not a build this CPU runs")
    else:
        try:
            lib = load(isa)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = (getattr(e, "stderr", None) or str(e)).strip()
            why = f"building it failed: {detail.splitlines()[-1] if detail else e}"
        else:
            log.info("native CPU kernel: the %s build", isa)
            return lib
    log.info("native CPU kernel off (%s): quantized layers and decode attention use "
             "torch's paths", why)
    return None


def full_build() -> bool:
    """Whether the AVX-512 build runs here: the one with an 8-bit path (int8 layers) and
    fast enough for quant.layers.NATIVE_MAX_WORK's wider row bound."""
    lib = library()
    return lib is not None and lib.isa == "avx512"


def pack(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int,
         bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes (K, N) in 0..2^bits - 1, zeros (G, N), scales (G, N) -> the kernel's tensors:
    packed uint8 (Np / 16, K / 8, 16, 4) for 4 bits (two codes a byte) or (Np / 16, K / 4,
    16, 4) for 8, scale and minus_zs fp32 (G, Np), N padded to Np."""
    k, n = codes.shape
    pad = -n % BLOCK
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, pad))  # (K, Np)
    if bits == 4:
        c = c.reshape(k // 8, 2, 4, -1, BLOCK)  # (k8, half, i, block, j): input 8k8 + 4half + i
        packed = (c[:, 0] | (c[:, 1] << 4)).permute(2, 0, 3, 1)  # (block, k8, j, i)
    else:
        packed = c.reshape(k // 4, 4, -1, BLOCK).permute(2, 0, 3, 1)  # (block, k4, j, i)
    scale = torch.nn.functional.pad(scales.float(), (0, pad)).contiguous()
    minus_zs = torch.nn.functional.pad(-zeros.float() * scales.float(), (0, pad)).contiguous()
    return packed.contiguous(), scale, minus_zs


def int8_as_codes(w8: torch.Tensor, w_scale: torch.Tensor, group_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights w8 (N, K) with per-channel scales (N,) as the kernel's 8-bit
    codes: (K, N) codes w8 + 128 in 0..255, zero 128, the channel's scale in every group."""
    n, k = w8.shape
    codes = w8.T.to(torch.int32) + 128  # (K, N)
    zeros = torch.full((k // group_size, n), 128, dtype=torch.int32, device=w8.device)
    return codes, zeros, w_scale.float()[None].expand(k // group_size, n)


def activation_group(k: int) -> int | None:
    """The activation group of a layer whose weights have no groups (int8): 128 inputs,
    or the largest of 64, 32, 16 that divides K; None when 16 does not."""
    return next((g for g in (128, 64, 32, 16) if k % g == 0), None)


def linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, minus_zs: torch.Tensor,
           n: int, group_size: int, bits: int = 4, lib: ctypes.CDLL | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) fp32 or bf16, contiguous -> (M, n) in x's dtype (written into `out` when
    given: contiguous, that shape and dtype), on torch's thread count; on `lib` (a
    `load(isa)` build) or this machine's `library()`."""
    m, k = x.shape
    inputs = packed.shape[1] * (8 if bits == 4 else 4)
    # raw pointers: a wrong tensor would be read out of bounds, so check what is cheap
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32) \
            or not x.is_contiguous() or k != inputs:
        raise ValueError(f"native_cpu.linear: x must be a contiguous CPU bf16/fp32 (M, "
                         f"{inputs}) tensor, got {x.dtype} {tuple(x.shape)} on {x.device}")
    if out is not None and (out.shape != (m, n) or out.dtype != x.dtype or
                            out.device.type != "cpu" or not out.is_contiguous()):
        raise ValueError(f"native_cpu.linear: out must be a contiguous CPU {x.dtype} "
                         f"{(m, n)} tensor, got {out.dtype} {tuple(out.shape)}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    if m == 0:
        return y  # no rows: nothing to call (the C side would allocate 0 bytes)
    small = k * n * bits <= 8 * SINGLE_THREAD_MAX_BYTES and m * k * n <= SINGLE_THREAD_MAX_WORK
    rc = (lib or library()).fanformer_wq_linear(
        x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, bits, packed.data_ptr(),
        scale.data_ptr(), minus_zs.data_ptr(), n, scale.shape[1], group_size, y.data_ptr(),
        1 if small else torch.get_num_threads())
    if rc == -2:
        raise ValueError(f"native_cpu.linear: this build has no {bits}-bit path")
    if rc:
        raise MemoryError("fanformer_wq_linear could not allocate its workspace")
    return y


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x (M, K) bf16 @ weight.T (+ bias) -> (M, N) bf16 with the kernel the fused decode step
    runs on bf16 weights (quant/native_kernels.h: bitwise the same for a row alone or in a
    batch, and in both builds; within bf16 rounding of F.linear), on torch's thread count."""
    m, k = x.shape
    n = weight.shape[0]
    tensors = (x, weight) + ((bias,) if bias is not None else ())
    if any(t.device.type != "cpu" or t.dtype != torch.bfloat16 or not t.is_contiguous()
           for t in tensors) or weight.shape[1] != k or k % 16 or \
            (bias is not None and bias.shape != (n,)):
        raise ValueError("native_cpu.bf16_linear: contiguous CPU bf16 x (M, K), weight (N, K) "
                         f"and bias (N), K a multiple of 16; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    y = torch.empty(m, n, dtype=torch.bfloat16)
    if m:
        (lib or library()).fanformer_bf16_linear(
            x.data_ptr(), m, k, weight.data_ptr(), bias.data_ptr() if bias is not None else None,
            n, y.data_ptr(), torch.get_num_threads())
    return y


class NativeKernel:
    """A layer's weights in the kernel's layout, called like the other weight-only kernels:
    x (M, K) bf16 or fp32 -> (M, N) in x's dtype. `perm` (act-order GPTQ) reorders x's
    inputs to the codes' contiguous groups."""

    def __init__(self, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int, perm: torch.Tensor | None = None, bits: int = 4):
        self.n, self.group_size, self.perm, self.bits = codes.shape[1], group_size, perm, bits
        self.packed, self.scale, self.minus_zs = pack(codes, zeros, scales, group_size, bits)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.perm is not None:
            x = x[:, self.perm]
        return linear(x.contiguous(), self.packed, self.scale, self.minus_zs, self.n,
                      self.group_size, self.bits, out=out)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, min_p_floor: torch.Tensor,
                top_p: torch.Tensor, uniform: torch.Tensor, threads: int,
                lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's first draw (quant/native_sample.c): logits (R, V) CPU fp32 or bf16,
    rows contiguous (a column slice of a wider tensor is fine); per row fp32 temperature,
    min-p floor log(min_p) (-inf: off), top_p and uniform (R,) -> token ids int64 (R,) and a
    status int8 (R,): 0 no finite weights, 1 drawn, 2 drawn outside the top-p nucleus."""
    r, v = logits.shape
    columns = (temperature, min_p_floor, top_p, uniform)
    if logits.device.type != "cpu" or logits.dtype not in (torch.bfloat16, torch.float32) \
            or logits.stride(1) != 1 or any(c.dtype != torch.float32 or c.shape != (r,)
                                            or not c.is_contiguous() for c in columns):
        raise ValueError("native_cpu.sample_rows: CPU fp32/bf16 logits (R, V) with unit "
                         f"column stride and fp32 (R,) columns; got {logits.dtype} "
                         f"{tuple(logits.shape)} stride {logits.stride()}")
    tokens = torch.empty(r, dtype=torch.int64)
    status = torch.empty(r, dtype=torch.int8)
    if r and (lib or library()).fanformer_sample_rows(
            logits.data_ptr(), int(logits.dtype == torch.bfloat16), r, v, logits.stride(0),
            *(c.data_ptr() for c in columns), tokens.data_ptr(), status.data_ptr(), threads):
        raise MemoryError("fanformer_sample_rows could not allocate its workspace")
    return tokens, status


class PagedDecode:
    """Decode attention straight from a paged KV cache (the C file's
    `fanformer_paged_decode`), for one engine step: built once from the decode rows' block
    tables and lengths (checked here, so that no layer's call can read outside the pool),
    then called per layer. Each row attends to its own first `length` positions only: no
    gather, no padding, no mask, and a row's result does not depend on the other rows."""

    MAX_GROUP = 64  # query heads per KV head (the C file's `total` array)

    def __init__(self, tables: list[list[int]], lengths: list[int], num_blocks: int,
                 block_size: int, lib: ctypes.CDLL | None = None):
        width = max(len(t) for t in tables)
        self.tables = torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                   dtype=torch.int64)  # (D, width)
        self.lengths = torch.tensor(lengths, dtype=torch.int64)  # (D,)
        sizes = torch.tensor([len(t) for t in tables], dtype=torch.int64)  # (D,)
        bad = (self.lengths <= 0) | (self.lengths > sizes * block_size) | \
            ((self.tables < 0) | (self.tables >= num_blocks)).any(dim=1)
        if bad.any():  # checked as tensors: a prefill's rows bring hundreds of tables
            i = int(bad.nonzero()[0])
            raise ValueError(f"PagedDecode: a table of {len(tables[i])} blocks (ids in "
                             f"[0, {num_blocks})) cannot hold {lengths[i]} positions")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.lib = lib or library()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (D, H, hd); k, v: one layer's (n_kv, num_blocks, block_size, hd) -> (D, H, hd)."""
        d, h, hd = q.shape
        n_kv = k.shape[0]
        if q.dtype not in (torch.bfloat16, torch.float32) or k.dtype != q.dtype or \
                v.dtype != q.dtype or not (q.is_contiguous() and k.is_contiguous() and
                                           v.is_contiguous()) or \
                k.shape != (n_kv, self.num_blocks, self.block_size, hd) or v.shape != k.shape \
                or h % n_kv or h // n_kv > self.MAX_GROUP or d != len(self.lengths):
            raise ValueError(f"PagedDecode: q {tuple(q.shape)} {q.dtype}, k/v "
                             f"{tuple(k.shape)} {k.dtype} do not fit this step's tables")
        out = torch.empty_like(q)
        rc = self.lib.fanformer_paged_decode(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), int(q.dtype == torch.bfloat16),
            self.tables.data_ptr(), self.tables.shape[1], self.lengths.data_ptr(), d, h, n_kv,
            self.num_blocks, self.block_size, hd, hd ** -0.5, out.data_ptr(),
            torch.get_num_threads())
        if rc:
            raise MemoryError("fanformer_paged_decode could not allocate its workspace")
        return out


if __name__ == "__main__":  # python -m quant.native_cpu --prebuild DIR
    import argparse

    parser = argparse.ArgumentParser(description="Build the native CPU kernels for every ISA.")
    parser.add_argument("--prebuild", type=Path, required=True, metavar="DIR")
    for built in prebuild(parser.parse_args().prebuild):
        print(built)
