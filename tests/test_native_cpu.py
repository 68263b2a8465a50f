"""The native kernel (quant/native_cpu.c): it computes what its float64 oracle says,
keeps rows apart bitwise at every row count and thread count, rounds bf16 output as torch
does, builds once into its cache, and is off (aten's kernels instead) where it cannot run."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

from quant import native_cpu

needs_kernel = pytest.mark.skipif(native_cpu.library() is None,
                                  reason="the native kernel does not run here")


@pytest.fixture
def lib(native_build):
    """Each build this CPU runs (tests/conftest.py)."""
    return native_build


def reference(x: torch.Tensor, codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """What the kernel computes, in float64 torch: x (M, K) -> (M, N). The per-group int8
    grid is computed in fp32, as the kernel computes it, so the codes are the same."""
    m, k = x.shape
    xg = x.double().reshape(m, k // group_size, group_size)  # (M, G, gs)
    amax = xg.float().abs().amax(-1, keepdim=True)  # (M, G, 1), fp32 as in the kernel
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(xg.float() * inv).double()  # (M, G, gs)
    a_scale, a_sum = (amax / 127).double(), q.sum(-1, keepdim=True)  # (M, G, 1)
    cg = codes.double().reshape(k // group_size, group_size, -1)  # (G, gs, N)
    dots = torch.einsum("mgk,gkn->mgn", q, cg)  # (M, G, N)
    per_group = scales.double() * dots - (zeros.double() * scales.double()) * a_sum
    return (a_scale * per_group).sum(1)  # (M, N)


def _weights(k, n, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=g)  # (K, N)
    zeros = torch.randint(0, 16, (k // group_size, n), generator=g)  # (G, N)
    scales = torch.rand(k // group_size, n, generator=g) * 0.01 + 1e-4  # (G, N)
    return codes, zeros, scales


@pytest.mark.parametrize("k, n, group_size", [(256, 48, 64), (512, 100, 128), (256, 16, 32),
                                              (512, 40, 256)])
def test_matches_the_float64_oracle(k, n, group_size, lib):
    """N not a multiple of 16 (the masked last block), every group size the layers use."""
    codes, zeros, scales = _weights(k, n, group_size)
    packed = native_cpu.pack(codes, zeros, scales, group_size)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(1))
    x[3] = 0  # an all-zero row: scale 0, no division by zero
    x[5, :group_size] *= 1000  # one outlier group does not touch the row's other groups
    got = native_cpu.linear(x, *packed, n, group_size, lib=lib).double()
    want = reference(x, codes, zeros, scales, group_size)
    assert torch.equal(got[3], torch.zeros(n, dtype=torch.float64))
    err = (got - want).abs().max() / want.abs().max()
    assert err < 1e-6, float(err)


@needs_kernel
def test_the_activation_grid_is_per_group():
    """Row 1's first group is 300x the rest but meets zero weights (codes at the zero
    point), so the output comes from the other groups only: on their own grids they keep
    int8 precision (the exact product within 1 %); on one grid for the row (or the
    tensor) they would round to almost nothing."""
    k, n, gs = 512, 64, 128
    codes, zeros, scales = _weights(k, n, gs, seed=2)
    codes[:gs] = zeros[0]  # group 0's weights are all zero
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(3))
    x[1, :gs] *= 300
    w = ((codes - zeros.repeat_interleave(gs, 0)) * scales.repeat_interleave(gs, 0)).T
    exact = (x.double() @ w.double().T)[1, :]
    got = native_cpu.linear(x, *native_cpu.pack(codes, zeros, scales, gs), n, gs)[1].double()
    assert (got - exact).norm() / exact.norm() < 0.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_never_mix_at_any_row_or_thread_count(dtype, lib):
    k, n, gs = 512, 72, 128
    codes, zeros, scales = _weights(k, n, gs, seed=4)
    packed = native_cpu.pack(codes, zeros, scales, gs)
    x = torch.randn(37, k, generator=torch.Generator().manual_seed(5)).to(dtype)
    x[9] *= 100
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([native_cpu.linear(x[i:i + 1], *packed, n, gs, lib=lib)
                           for i in range(37)])
        torch.set_num_threads(2)
        for rows in (1, 3, 4, 5, 16, 37):  # the 8-, 4-, 2- and 1-row paths, mixed
            got = native_cpu.linear(x[:rows], *packed, n, gs, lib=lib)
            assert torch.equal(got, alone[:rows]), rows
    finally:
        torch.set_num_threads(threads)


def _int8_layer(k, n, seed=10):
    g = torch.Generator().manual_seed(seed)
    w8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)  # (N, K)
    return w8, torch.rand(n, generator=g) * 0.01 + 1e-4  # per-channel scales (N,)


@pytest.mark.parametrize("k, n", [(256, 48), (512, 100), (96, 40)])  # 96: groups of 32
def test_int8_weights_match_the_oracle_and_never_mix_rows(k, n):
    """8-bit weights (an int8 layer's, as codes + 128 with zero 128) on the AVX-512 build:
    the oracle, then rows alone == rows in a batch."""
    if not native_cpu.full_build():
        pytest.skip("the 8-bit path is in the AVX-512 build only")
    w8, w_scale = _int8_layer(k, n)
    group = native_cpu.activation_group(k)
    codes, zeros, scales = native_cpu.int8_as_codes(w8, w_scale, group)
    kernel = native_cpu.NativeKernel(codes, zeros, scales, group, bits=8)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(11))
    x[2, :group] *= 500
    got = kernel(x).double()
    want = reference(x, codes, zeros, scales, group)
    assert (got - want).abs().max() / want.abs().max() < 1e-6
    exact = x.double() @ (w8.double() * w_scale.double()[:, None]).T
    assert (got - exact).norm() / exact.norm() < 0.01  # int8 activations per group
    alone = torch.cat([kernel(x[i:i + 1]) for i in range(9)])
    assert torch.equal(kernel(x), alone)


def test_the_avx2_build_refuses_8_bit_weights():
    """VPMADDUBSW would saturate on codes up to 255: the AVX2 entry says so, no wrong sums."""
    if not native_cpu.ISAS["avx2"][1] <= native_cpu.cpu_flags() or native_cpu.library() is None:
        pytest.skip("the avx2 build does not run here")
    w8, w_scale = _int8_layer(64, 16)
    packed = native_cpu.pack(*native_cpu.int8_as_codes(w8, w_scale, 64), 64, bits=8)
    with pytest.raises(ValueError, match="no 8-bit path"):
        native_cpu.linear(torch.randn(1, 64), *packed, 16, 64, bits=8,
                          lib=native_cpu.load("avx2"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_build_gives_the_same_bits(dtype):
    """The AVX2 build (laptops) computes what the AVX-512 one does, bit for bit: the same
    int32 sums and the same fp32 epilogue. Runs where the CPU has both."""
    if not all(needed <= native_cpu.cpu_flags() for _, needed in native_cpu.ISAS.values()) or \
            native_cpu.library() is None:
        pytest.skip("needs a CPU that runs every build")
    k, n, gs = 512, 56, 128
    codes, zeros, scales = _weights(k, n, gs, seed=8)
    packed = native_cpu.pack(codes, zeros, scales, gs)
    x = torch.randn(11, k, generator=torch.Generator().manual_seed(9)).to(dtype)
    outs = [native_cpu.linear(x, *packed, n, gs, lib=native_cpu.load(isa))
            for isa in native_cpu.ISAS]
    assert all(torch.equal(out, outs[0]) for out in outs[1:])


@needs_kernel
def test_bf16_in_bf16_out_rounds_like_torch():
    """bf16 x is read exactly and the fp32 result is rounded to nearest even, as
    `.to(torch.bfloat16)` does: the bf16 call equals the fp32 call on the same values."""
    k, n, gs = 256, 40, 64
    codes, zeros, scales = _weights(k, n, gs, seed=6)
    packed = native_cpu.pack(codes, zeros, scales, gs)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    via_fp32 = native_cpu.linear(x.float(), *packed, n, gs).to(torch.bfloat16)
    assert torch.equal(native_cpu.linear(x, *packed, n, gs), via_fp32)


@needs_kernel
def test_no_rows_give_no_rows():
    codes, zeros, scales = _weights(256, 32, 64)
    out = native_cpu.linear(torch.randn(0, 256), *native_cpu.pack(codes, zeros, scales, 64),
                            32, 64)
    assert out.shape == (0, 32)


@needs_kernel
def test_refuses_what_it_would_read_out_of_bounds():
    codes, zeros, scales = _weights(256, 32, 64)
    packed = native_cpu.pack(codes, zeros, scales, 64)
    for bad in (torch.randn(2, 128), torch.randn(2, 256).half(), torch.randn(256, 2).T):
        with pytest.raises(ValueError, match="contiguous CPU bf16/fp32"):
            native_cpu.linear(bad, *packed, 32, 64)


def dense_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The bf16 linear's documented order in torch, bit for bit: x (M, K), w (N, K) bf16 ->
    (M, N) bf16. A bf16 x bf16 product is exact in fp32, so an fp32 add of it is the FMA."""
    m, k = x.shape
    products = x.float()[:, None, :] * w.float()[None]  # (M, N, K), exact
    lanes = torch.zeros(m, w.shape[0], 16)  # (M, N, 16): lane j sums k = j, j + 16, ...
    for chunk in products.reshape(m, w.shape[0], k // 16, 16).unbind(2):
        lanes = lanes + chunk
    for half in (8, 4, 2, 1):  # the fixed tree
        lanes = lanes[..., :half] + lanes[..., half:2 * half]
    out = lanes[..., 0] + (bias.float() if bias is not None else 0)
    return out.to(torch.bfloat16)


@pytest.mark.parametrize("k, n, rows, bias", [(64, 16, 1, False), (512, 100, 13, True),
                                               (256, 37, 3, False), (768, 8, 2, True)])
def test_bf16_linear_sums_in_its_documented_order(k, n, rows, bias, lib):
    """Both builds, at 1 and 2 threads, and whatever the row count (a row alone == in the
    batch): the oracle's bits; and within bf16 rounding of F.linear."""
    g = torch.Generator().manual_seed(k + n)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    expected = dense_reference(x, w, b)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            assert torch.equal(native_cpu.bf16_linear(x, w, b, lib=lib), expected)
            assert torch.equal(native_cpu.bf16_linear(x[-1:], w, b, lib=lib), expected[-1:])
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(expected, torch.nn.functional.linear(x, w, b), rtol=0.016,
                               atol=0.016)


@needs_kernel
def test_bf16_linear_refuses_what_it_cannot_read():
    w = torch.randn(32, 64).to(torch.bfloat16)
    for x, weight in ((torch.randn(2, 64), w), (torch.randn(2, 48).to(torch.bfloat16), w[:, :48]),
                      (torch.randn(2, 32).to(torch.bfloat16), w)):
        with pytest.raises(ValueError, match="K a multiple of 16"):
            native_cpu.bf16_linear(x, weight)


def _library_in_subprocess(env: dict[str, str]) -> str:
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
            "from quant import native_cpu; print('LOADED', native_cpu.library() is not None)")
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, check=True, timeout=120).stdout


@needs_kernel
def test_builds_once_into_its_cache_readable_by_all(tmp_path):
    out = _library_in_subprocess({"FANFORMER_KERNEL_CACHE": str(tmp_path)})
    assert "LOADED True" in out
    [built] = tmp_path.iterdir()
    assert built.suffix == ".so" and stat.S_IMODE(built.stat().st_mode) == 0o755
    mtime = built.stat().st_mtime_ns
    assert "LOADED True" in _library_in_subprocess({"FANFORMER_KERNEL_CACHE": str(tmp_path)})
    assert [p.name for p in tmp_path.iterdir()] == [built.name]
    assert built.stat().st_mtime_ns == mtime  # reused, not rebuilt


@pytest.mark.parametrize("env, why", [
    ({"FANFORMER_NATIVE_KERNELS": "0"}, "FANFORMER_NATIVE_KERNELS=0"),
    # no compiler: "building it failed" where the CPU could run a build at all
    ({"CC": "/nonexistent/gcc"}, "building it failed" if native_cpu.best_isa() else "lacks"),
])
def test_off_with_the_reason_logged(env, why, tmp_path):
    out = _library_in_subprocess({**env, "FANFORMER_KERNEL_CACHE": str(tmp_path)})
    assert "LOADED False" in out and "native CPU kernel off" in out and why in out
    assert not list(tmp_path.iterdir())  # nothing built, nothing left behind


@needs_kernel
def test_prebuilt_builds_load_without_a_compiler_and_only_for_this_source(tmp_path):
    """The Docker image's way: every ISA built beforehand (the CPU here need not run them
    all), then loaded where there is no compiler; a build of other sources is not."""
    prebuilt, cache = tmp_path / "prebuilt", tmp_path / "cache"
    subprocess.run([sys.executable, "-m", "quant.native_cpu", "--prebuild", str(prebuilt)],
                   check=True, capture_output=True, timeout=300)
    assert sorted(p.name.split("-")[1] for p in prebuilt.iterdir()) == sorted(native_cpu.ISAS)
    no_compiler = {"CC": "", "PATH": "/nonexistent", "FANFORMER_KERNEL_CACHE": str(cache)}
    out = _library_in_subprocess({**no_compiler, "FANFORMER_PREBUILT_KERNELS": str(prebuilt)})
    assert "LOADED True" in out and not cache.exists()  # nothing compiled
    for built in prebuilt.iterdir():  # as if built from another version of the source
        built.rename(built.with_name(built.name.replace("-", "-0", 2)))
    out = _library_in_subprocess({**no_compiler, "FANFORMER_PREBUILT_KERNELS": str(prebuilt)})
    assert "LOADED False" in out and "no build of this source" in out
