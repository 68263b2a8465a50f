/* 4-bit weights x int8 activations on AVX-512 VNNI: one call per linear, batch-invariant.
 *
 * y (M, N) = x (M, K) @ W.T, W[n, k] = (code[n, k] - zero[g, n]) * scale[g, n], g = k / gs.
 * Each row of x is quantized to int8 per group of gs inputs (its own absmax grid, as
 * llama.cpp's q8 activations are), so within a group the products are exact int32 sums
 * (VPDPBUSD: unsigned 4-bit codes times signed 8-bit activations); per group:
 *     y += a_scale[m, g] * (scale[g, n] * dot + minus_zs[g, n] * a_sum[m, g])
 * with minus_zs = -zero * scale and a_sum the group's activation code sum. A row's result
 * is computed by the same instructions in the same order whatever the number of rows and
 * threads, so it is bitwise the same alone and in a batch.
 *
 * Packed layout (built by quant/int4_cpu.py): channel blocks of 16; for block b and each
 * 8 inputs k8, 64 bytes = 16 channels x 4 bytes; byte i of channel j holds the code of
 * input 8*k8 + i in its low nibble and of input 8*k8 + 4 + i in its high nibble. One
 * 64-byte load gives two VPDPBUSD operands of 16 channels x 4 inputs each.
 *
 * Built at run time by quant/int4_cpu.py (gcc, -fopenmp); loaded after torch, so the
 * OpenMP runtime is torch's own libgomp and the threads are its pool.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 16 /* output channels per block: one zmm of int32 lanes */
#define ROWS 8   /* rows sharing one decoded weight vector (then 4, then 1) */

static inline __m512 load16(const void *x, int bf16, int64_t i) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)x + i);
}

/* fp32 -> bf16, round to nearest even (what torch's .to(torch.bfloat16) does for finite
 * values), stored with a lane mask for the last block of channels. */
static inline void store16(void *y, int bf16, int64_t i, __m512 v, __mmask16 mask) {
    if (bf16) {
        __m512i u = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
        __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
        _mm256_mask_storeu_epi16((uint16_t *)y + i, mask, h);
    } else {
        _mm512_mask_storeu_ps((float *)y + i, mask, v);
    }
}

/* Row m of x, group by group: int8 codes q (K), scales a_scale (G), code sums a_sum (G). */
static void quantize_row(const void *x, int bf16, int64_t K, int64_t gs, int8_t *q,
                         float *a_scale, float *a_sum) {
    for (int64_t g0 = 0, g = 0; g0 < K; g0 += gs, g++) {
        __m512 amax = _mm512_setzero_ps();
        for (int64_t k = g0; k < g0 + gs; k += 16)
            amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x, bf16, k)));
        float m = _mm512_reduce_max_ps(amax);
        float inv = m > 0.0f ? 127.0f / m : 0.0f;
        __m512 vinv = _mm512_set1_ps(inv);
        __m512i sum = _mm512_setzero_si512();
        for (int64_t k = g0; k < g0 + gs; k += 16) {
            __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(load16(x, bf16, k), vinv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m512i c = _mm512_cvtps_epi32(r);
            sum = _mm512_add_epi32(sum, c);
            _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtepi32_epi8(c));
        }
        a_scale[g] = m / 127.0f;
        a_sum[g] = (float)_mm512_reduce_add_epi32(sum);
    }
}

/* Rows m0 .. m0+R-1 times one block of 16 channels. R is a compile-time constant at each
 * call, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void block_rows(
    const int R, const int8_t *q, const float *a_scale, const float *a_sum, int64_t m0,
    int64_t K, int64_t G, int64_t gs, const uint8_t *wblock, const float *scale,
    const float *minus_zs, int64_t Np, int64_t n0, void *y, int ybf16, int64_t N,
    __mmask16 mask) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 out[ROWS];
    for (int r = 0; r < R; r++) out[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512i acc[ROWS];
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
        const uint8_t *w = wblock + g * (gs / 8) * 64;
        for (int64_t k8 = 0; k8 < gs / 8; k8++) {
            __m512i packed = _mm512_loadu_si512((const void *)(w + k8 * 64));
            __m512i lo = _mm512_and_si512(packed, low);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
            int64_t k = g * gs + k8 * 8;
            for (int r = 0; r < R; r++) {
                int32_t a0, a1;
                memcpy(&a0, q + (m0 + r) * K + k, 4);
                memcpy(&a1, q + (m0 + r) * K + k + 4, 4);
                acc[r] = _mm512_dpbusd_epi32(acc[r], lo, _mm512_set1_epi32(a0));
                acc[r] = _mm512_dpbusd_epi32(acc[r], hi, _mm512_set1_epi32(a1));
            }
        }
        __m512 s = _mm512_loadu_ps(scale + g * Np + n0);
        __m512 mz = _mm512_loadu_ps(minus_zs + g * Np + n0);
        for (int r = 0; r < R; r++) {
            int64_t i = (m0 + r) * G + g;
            __m512 t = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(acc[r]),
                                       _mm512_mul_ps(mz, _mm512_set1_ps(a_sum[i])));
            out[r] = _mm512_fmadd_ps(_mm512_set1_ps(a_scale[i]), t, out[r]);
        }
    }
    for (int r = 0; r < R; r++) store16(y, ybf16, (m0 + r) * N + n0, out[r], mask);
}

/* x (M, K) fp32 or bf16 (bf16 != 0), y (M, N) in the same dtype. packed: (Np / 16) blocks
 * of K / 8 x 64 bytes; scale, minus_zs: (K / gs, Np) fp32, Np = N rounded up to 16, the
 * padding channels zero. K must be a multiple of gs and gs of 16. Returns 0, or -1 when
 * the workspace cannot be allocated. */
int fanformer_w4a8_linear(const void *x, int bf16, int64_t M, int64_t K,
                          const uint8_t *packed, const float *scale, const float *minus_zs,
                          int64_t N, int64_t Np, int64_t gs, void *y, int nthreads) {
    const int64_t G = K / gs, blocks = Np / BLOCK;
    int8_t *q = (int8_t *)malloc((size_t)(M * K));
    float *a_scale = (float *)malloc(sizeof(float) * (size_t)(M * G));
    float *a_sum = (float *)malloc(sizeof(float) * (size_t)(M * G));
    if (!q || !a_scale || !a_sum) {
        free(q); free(a_scale); free(a_sum);
        return -1;
    }
    const size_t row_bytes = bf16 ? 2 : 4;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++)
            quantize_row((const char *)x + m * K * row_bytes, bf16, K, gs, q + m * K,
                         a_scale + m * G, a_sum + m * G);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t n0 = b * BLOCK;
            const __mmask16 mask = N - n0 >= BLOCK ? (__mmask16)0xFFFF
                                                   : (__mmask16)((1u << (N - n0)) - 1);
            const uint8_t *wblock = packed + b * (K / 8) * 64;
            int64_t m0 = 0;
            for (; m0 + ROWS <= M; m0 += ROWS)
                block_rows(ROWS, q, a_scale, a_sum, m0, K, G, gs, wblock, scale, minus_zs,
                           Np, n0, y, bf16, N, mask);
            for (; m0 + ROWS / 2 <= M; m0 += ROWS / 2)
                block_rows(ROWS / 2, q, a_scale, a_sum, m0, K, G, gs, wblock, scale,
                           minus_zs, Np, n0, y, bf16, N, mask);
            for (; m0 < M; m0++)
                block_rows(1, q, a_scale, a_sum, m0, K, G, gs, wblock, scale, minus_zs, Np,
                           n0, y, bf16, N, mask);
        }
    }
    free(q); free(a_scale); free(a_sum);
    return 0;
}
