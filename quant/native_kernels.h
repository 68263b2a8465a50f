/* Shared inline helpers of the native CPU kernels (native_cpu.c: a quantized linear and
 * paged decode attention; native_step.c: a whole decode step built from the same pieces).
 * Static inline so that each file's hot loops keep them in registers; see native_cpu.c for
 * the weight layout and the numerics. */
#ifndef FANFORMER_NATIVE_KERNELS_H
#define FANFORMER_NATIVE_KERNELS_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 16 /* output channels per block: one zmm (two ymm) of int32 lanes */
#ifdef FANFORMER_AVX512
#define ROWS 8 /* rows sharing one decoded weight vector (then 4, then 1) */
#else
#define ROWS 2 /* AVX2 has 16 registers: two rows, then one */
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even, as torch does for finite values */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

#ifdef FANFORMER_AVX512

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
    int64_t K, int64_t G, int64_t gs, int bits, const uint8_t *wblock, const float *scale,
    const float *minus_zs, int64_t Np, int64_t n0, void *y, int ybf16, int64_t N,
    __mmask16 mask) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 out[ROWS];
    for (int r = 0; r < R; r++) out[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512i acc[ROWS];
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
        if (bits == 4) {
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
        } else { /* 8-bit codes, one byte each: 64 bytes = 16 channels x 4 inputs */
            const uint8_t *w = wblock + g * (gs / 4) * 64;
            for (int64_t k4 = 0; k4 < gs / 4; k4++) {
                __m512i codes = _mm512_loadu_si512((const void *)(w + k4 * 64));
                int64_t k = g * gs + k4 * 4;
                for (int r = 0; r < R; r++) {
                    int32_t a0;
                    memcpy(&a0, q + (m0 + r) * K + k, 4);
                    acc[r] = _mm512_dpbusd_epi32(acc[r], codes, _mm512_set1_epi32(a0));
                }
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

#else /* AVX2 */

static inline float load1(const void *x, int bf16, int64_t i) {
    return bf16 ? bf16_to_float(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* As the AVX-512 build: the same amax, the same fp32 products, the same rounding (half to
 * even: nearbyintf in the default rounding mode), so the same codes and scales. */
static void quantize_row(const void *x, int bf16, int64_t K, int64_t gs, int8_t *q,
                         float *a_scale, float *a_sum) {
    for (int64_t g0 = 0, g = 0; g0 < K; g0 += gs, g++) {
        float m = 0.0f;
        for (int64_t k = g0; k < g0 + gs; k++) {
            float a = fabsf(load1(x, bf16, k));
            m = a > m ? a : m;
        }
        float inv = m > 0.0f ? 127.0f / m : 0.0f;
        int32_t sum = 0;
        for (int64_t k = g0; k < g0 + gs; k++) {
            int32_t c = (int32_t)nearbyintf(load1(x, bf16, k) * inv);
            sum += c;
            q[k] = (int8_t)c;
        }
        a_scale[g] = m / 127.0f;
        a_sum[g] = (float)sum;
    }
}

static inline __m256i dot4(__m256i acc, __m256i codes, __m256i a) {
    __m256i pairs = _mm256_maddubs_epi16(codes, a);  /* u8 x s8, pairs summed to int16 */
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

static inline __attribute__((always_inline)) void block_rows(
    const int R, const int8_t *q, const float *a_scale, const float *a_sum, int64_t m0,
    int64_t K, int64_t G, int64_t gs, int bits, const uint8_t *wblock, const float *scale,
    const float *minus_zs, int64_t Np, int64_t n0, void *y, int ybf16, int64_t N,
    int64_t valid) {
    (void)bits; /* 4 only: the entry refuses 8 in this build */
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 out[ROWS][2];
    for (int r = 0; r < R; r++) out[r][0] = out[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256i acc[ROWS][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
        const uint8_t *w = wblock + g * (gs / 8) * 64;
        for (int64_t k8 = 0; k8 < gs / 8; k8++) {
            __m256i lo[2], hi[2];
            for (int h = 0; h < 2; h++) {
                __m256i packed = _mm256_loadu_si256((const __m256i *)(w + k8 * 64 + h * 32));
                lo[h] = _mm256_and_si256(packed, low);
                hi[h] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
            }
            int64_t k = g * gs + k8 * 8;
            for (int r = 0; r < R; r++) {
                int32_t a0, a1;
                memcpy(&a0, q + (m0 + r) * K + k, 4);
                memcpy(&a1, q + (m0 + r) * K + k + 4, 4);
                __m256i b0 = _mm256_set1_epi32(a0), b1 = _mm256_set1_epi32(a1);
                for (int h = 0; h < 2; h++)
                    acc[r][h] = dot4(dot4(acc[r][h], lo[h], b0), hi[h], b1);
            }
        }
        for (int h = 0; h < 2; h++) {
            __m256 s = _mm256_loadu_ps(scale + g * Np + n0 + 8 * h);
            __m256 mz = _mm256_loadu_ps(minus_zs + g * Np + n0 + 8 * h);
            for (int r = 0; r < R; r++) {
                int64_t i = (m0 + r) * G + g;
                __m256 t = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(acc[r][h]),
                                           _mm256_mul_ps(mz, _mm256_set1_ps(a_sum[i])));
                out[r][h] = _mm256_fmadd_ps(_mm256_set1_ps(a_scale[i]), t, out[r][h]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        float lanes[BLOCK];
        _mm256_storeu_ps(lanes, out[r][0]);
        _mm256_storeu_ps(lanes + 8, out[r][1]);
        int64_t base = (m0 + r) * N + n0;
        for (int64_t j = 0; j < valid; j++) {
            if (ybf16)
                ((uint16_t *)y)[base + j] = float_to_bf16(lanes[j]);
            else
                ((float *)y)[base + j] = lanes[j];
        }
    }
}

#endif

static inline void row_to_float(const void *src, int bf16, int64_t i, int64_t n, float *dst) {
    if (bf16) {
        const uint16_t *s = (const uint16_t *)src + i;
        for (int64_t j = 0; j < n; j++) dst[j] = bf16_to_float(s[j]);
    } else {
        memcpy(dst, (const float *)src + i, sizeof(float) * (size_t)n);
    }
}

/* ---- a team: the threads of one OpenMP region, synchronised by spinning ----
 * libgomp's barriers under OMP_WAIT_POLICY=PASSIVE (what fanformer-serve sets) put a waiting
 * thread to sleep at once and wake it with a futex, microseconds each; a fused decode step
 * has about 16 of them a block (docs/ENGINE.md "The native decode step" measures what they
 * cost). Within one call every thread of the team is busy anyway, so
 * a waiting thread spins, and yields its core after SPIN_LIMIT pauses in case the one it
 * waits for lost its own. Loops split as `schedule(static)` would: contiguous shares. */
#include <omp.h>
#include <sched.h>
#define SPIN_LIMIT 2000
typedef struct {
    int count, sense;
} team_barrier_t;
typedef struct {
    int tid, n, sense;
    team_barrier_t *bar;
} team_t;
#define TEAM_BARRIER_INIT {0, 0}
#define TEAM_SOLO {0, 1, 0, NULL}

/* Inside `#pragma omp parallel`: this thread's member of the team sharing `bar` (every
 * thread of the region, however many it got). */
static inline team_t team_join(team_barrier_t *bar) {
    team_t t = {omp_get_thread_num(), omp_get_num_threads(), 0, bar};
    return t;
}

static inline void team_sync(team_t *t) {
    if (t->n == 1) return;
    t->sense = !t->sense;
    if (__atomic_add_fetch(&t->bar->count, 1, __ATOMIC_ACQ_REL) == t->n) {
        __atomic_store_n(&t->bar->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&t->bar->sense, t->sense, __ATOMIC_RELEASE);
    } else {
        for (int spins = 0; __atomic_load_n(&t->bar->sense, __ATOMIC_ACQUIRE) != t->sense;
             spins++)
            if (spins < SPIN_LIMIT) _mm_pause(); else sched_yield();
    }
}

static inline int64_t team_lo(const team_t *t, int64_t total) {
    const int64_t share = (total + t->n - 1) / t->n, lo = t->tid * share;
    return lo < total ? lo : total;
}

static inline int64_t team_hi(const team_t *t, int64_t total) {
    const int64_t hi = team_lo(t, total) + (total + t->n - 1) / t->n;
    return hi < total ? hi : total;
}

/* for i over this thread's share of [0, total); follow the loop with team_sync */
#define TEAM_FOR(t, i, total) \
    for (int64_t i = team_lo(t, total), i##_end = team_hi(t, total); i < i##_end; i++)

/* y (M, N) = x (M, K) @ W.T (the layout and numerics: native_cpu.c), with the caller's
 * workspace q (M * K), a_scale and a_sum (M * K / gs), by the team: rows quantized, then the
 * channel blocks shared out, each phase ended by a team_sync. */
static void wq_linear_rows(team_t *t, const void *x, int bf16, int64_t M, int64_t K, int bits,
                           const uint8_t *packed, const float *scale, const float *minus_zs,
                           int64_t N, int64_t Np, int64_t gs, void *y, int8_t *q,
                           float *a_scale, float *a_sum) {
    const int64_t G = K / gs, blocks = Np / BLOCK;
    const size_t row_bytes = bf16 ? 2 : 4;
    TEAM_FOR(t, m, M)
        quantize_row((const char *)x + m * K * row_bytes, bf16, K, gs, q + m * K,
                     a_scale + m * G, a_sum + m * G);
    team_sync(t);
    TEAM_FOR(t, b, blocks) {
        const int64_t n0 = b * BLOCK;
#ifdef FANFORMER_AVX512
        const __mmask16 mask = N - n0 >= BLOCK ? (__mmask16)0xFFFF
                                               : (__mmask16)((1u << (N - n0)) - 1);
#else
        const int64_t mask = N - n0 >= BLOCK ? BLOCK : N - n0;  /* valid channels */
#endif
        const uint8_t *wblock = packed + b * K * BLOCK * bits / 8;
        int64_t m0 = 0;
        for (; m0 + ROWS <= M; m0 += ROWS)
            block_rows(ROWS, q, a_scale, a_sum, m0, K, G, gs, bits, wblock, scale, minus_zs,
                       Np, n0, y, bf16, N, mask);
        for (; m0 + ROWS / 2 <= M; m0 += ROWS / 2)
            block_rows(ROWS / 2, q, a_scale, a_sum, m0, K, G, gs, bits, wblock, scale,
                       minus_zs, Np, n0, y, bf16, N, mask);
        for (; m0 < M; m0++)
            block_rows(1, q, a_scale, a_sum, m0, K, G, gs, bits, wblock, scale, minus_zs, Np,
                       n0, y, bf16, N, mask);
    }
    team_sync(t);
}

/* ---- a bf16 linear: y (M, N) bf16 = x (M, K) bf16 @ W.T (+ bias), W (N, K) bf16 ----
 * W is an nn.Linear's own weight, row-major as torch stores it (read in place, no copy).
 * Why not torch's: inside the fused decode step a one-row bf16 projection is then one more
 * loop of the step's OpenMP region instead of a GEMV in its own region, whose sleeping
 * worker (OMP_WAIT_POLICY=PASSIVE) is woken ~60 times a step (docs/ENGINE.md "Threads").
 * Numerics: per output, 16 fp32 lanes, lane j summing k = j, j + 16, ... in order with one
 * FMA each (a bf16 x bf16 product is exact in fp32, so each step rounds once); then the
 * lanes in a fixed tree (j + 8, j + 4, j + 2, j + 1), the bias, one rounding to bf16. The
 * same instructions in the same order in both builds, at any M and thread count: a row's
 * result is bitwise the same alone and in a batch, AVX2 or AVX-512. It is not F.linear's
 * bits (oneDNN sums in another order): within bf16 rounding of them. K % 16 == 0. */
#ifdef FANFORMER_AVX512
#define DENSE_OUTS 8 /* outputs per pass over the weights' rows */
#define DENSE_ROWS 2 /* rows per pass (then 1): 16 accumulators */
typedef __m512 lanes16_t;
static inline lanes16_t lanes_zero(void) { return _mm512_setzero_ps(); }
static inline lanes16_t lanes_bf16(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline lanes16_t lanes_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline lanes16_t lanes_set1(float v) { return _mm512_set1_ps(v); }
static inline void lanes_store(float *p, lanes16_t v) { _mm512_storeu_ps(p, v); }
static inline lanes16_t lanes_fma(lanes16_t a, lanes16_t b, lanes16_t c) {
    return _mm512_fmadd_ps(a, b, c);
}
static inline float lanes_sum(lanes16_t v) {
    __m256 lo = _mm512_castps512_ps256(v);
    __m256 hi = _mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(v), 1));
    __m256 s8 = _mm256_add_ps(lo, hi);  /* j + (j + 8) */
#else /* AVX2: 16 registers, each accumulator two of them: 2 x 2 of them, 2 rows' x, 1 weight */
#define DENSE_OUTS 2
#define DENSE_ROWS 2
typedef struct { __m256 lo, hi; } lanes16_t;  /* lanes 0-7, 8-15 */
static inline lanes16_t lanes_zero(void) {
    lanes16_t v = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    return v;
}
static inline __m256 bf16x8(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline lanes16_t lanes_bf16(const uint16_t *p) {
    lanes16_t v = {bf16x8(p), bf16x8(p + 8)};
    return v;
}
static inline lanes16_t lanes_f32(const float *p) {
    lanes16_t v = {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
    return v;
}
static inline lanes16_t lanes_set1(float x) {
    lanes16_t v = {_mm256_set1_ps(x), _mm256_set1_ps(x)};
    return v;
}
static inline void lanes_store(float *p, lanes16_t v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
}
static inline lanes16_t lanes_fma(lanes16_t a, lanes16_t b, lanes16_t c) {
    lanes16_t v = {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
    return v;
}
static inline float lanes_sum(lanes16_t v) {
    __m256 s8 = _mm256_add_ps(v.lo, v.hi);  /* j + (j + 8) */
#endif
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));             /* j + (j + 2) */
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));  /* 0 + 1 */
}

/* rows m0 .. m0+R-1 times outputs n0 .. n0+NO-1; R and NO compile-time constants at each
 * call, so the R x NO accumulators stay in registers */
static inline __attribute__((always_inline)) void dense_rows(
    const int R, const int NO, const uint16_t *x, int64_t m0, int64_t K, const uint16_t *w,
    int64_t n0, const uint16_t *bias, uint16_t *y, int64_t N) {
    lanes16_t acc[DENSE_ROWS][DENSE_OUTS];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NO; j++) acc[r][j] = lanes_zero();
    for (int64_t k = 0; k < K; k += 16) {
        lanes16_t xs[DENSE_ROWS];
        for (int r = 0; r < R; r++) xs[r] = lanes_bf16(x + (m0 + r) * K + k);
        if (!(k & 31))  /* the next outputs' weights, a cache line each: streams too short
                         * (K * 2 bytes) for the hardware prefetcher to find */
            for (int j = 0; j < NO; j++)
                _mm_prefetch((const char *)(w + (n0 + NO + j) * K + k), _MM_HINT_T0);
        for (int j = 0; j < NO; j++) {
            const lanes16_t wj = lanes_bf16(w + (n0 + j) * K + k);
            for (int r = 0; r < R; r++) acc[r][j] = lanes_fma(wj, xs[r], acc[r][j]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NO; j++) {
            float v = lanes_sum(acc[r][j]);
            if (bias) v += bf16_to_float(bias[n0 + j]);
            y[(m0 + r) * N + n0 + j] = float_to_bf16(v);
        }
}

/* every row times outputs n0 .. n0+NO-1 (NO a compile-time constant at each call): rows in
 * pairs, then one */
static inline __attribute__((always_inline)) void dense_outputs(
    const int NO, const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t n0,
    const uint16_t *bias, uint16_t *y, int64_t N) {
    int64_t m0 = 0;
    for (; m0 + DENSE_ROWS <= M; m0 += DENSE_ROWS)
        dense_rows(DENSE_ROWS, NO, x, m0, K, w, n0, bias, y, N);
    for (; m0 < M; m0++) dense_rows(1, NO, x, m0, K, w, n0, bias, y, N);
}

/* Up to this many rows, one output at a time: its weight row streams through in memory
 * order, which an AMD EPYC (Zen 4) reads much faster than DENSE_OUTS weight rows
 * interleaved (docs/ENGINE.md "bf16 linears in C"); above, the tile's reuse of each loaded
 * weight across rows wins. Each sum is taken in the same order either way: the same bits. */
#define DENSE_ONE_OUTPUT_ROWS 4

/* the team's share of the outputs (one at a time, or groups of DENSE_OUTS), every row;
 * ends with a team_sync */
static void dense_linear_rows(team_t *t, const uint16_t *x, int64_t M, int64_t K,
                              const uint16_t *w, const uint16_t *bias, int64_t N, uint16_t *y) {
    const int64_t group = M <= DENSE_ONE_OUTPUT_ROWS ? 1 : DENSE_OUTS;
    TEAM_FOR(t, c, (N + group - 1) / group) {
        const int64_t n0 = c * group;
        if (group == DENSE_OUTS && n0 + DENSE_OUTS <= N)
            dense_outputs(DENSE_OUTS, x, M, K, w, n0, bias, y, N);
        else  /* one at a time, or the last outputs short of a group */
            for (int64_t n = n0; n < n0 + group && n < N; n++)
                dense_outputs(1, x, M, K, w, n, bias, y, N);
    }
    team_sync(t);
}

/* Decode attention of one (row, kv head) item (native_cpu.c's fanformer_paged_decode):
 * the row's g query heads over its first lens[d] positions, through its block table.
 * buf: (2 g hd + hd + g longest) floats of the caller's.
 * The positions are walked block by block (a block's bs rows are contiguous, the blocks
 * anywhere in the pool), K two blocks ahead and V one block ahead prefetched: without it
 * the loop waited on each row's load. A bf16 cache with hd % 16 == 0 (every preset) takes
 * the lanes path: each score a 16-lane dot (lane l sums i = l, l + 16, ... with one FMA
 * each, then the bf16 linear's lane tree), K and V read as bf16 in place, the V rows summed
 * 16 lanes at a time for up to ATTEND_HEADS heads kept in registers over all positions
 * (each element's sum in position order, the same bits as accumulating row by row); the
 * same instructions in the same order in both builds. Other shapes and fp32 caches take
 * the scalar loops. Softmax in between with libm's expf. */
static inline void prefetch_block(const void *cache, int bf16, int64_t at, int64_t rows,
                                  int64_t hd) {
    const char *p = (const char *)cache + at * (bf16 ? 2 : 4);
    for (int64_t i = 0; i < rows * hd * (bf16 ? 2 : 4); i += 64)
        _mm_prefetch(p + i, _MM_HINT_T0);
}

#define ATTEND_HEADS 4 /* query heads per pass over V (their accumulators in registers) */

/* where block b of the item's table starts in the cache (elements), and its rows in use */
#define BLOCK_AT(b) ((base + table[(b)]) * bs * hd)
#define BLOCK_ROWS(b) (len - (b) * bs < bs ? len - (b) * bs : bs)

static void attend_item(const void *q, const void *kc, const void *vc, int bf16,
                        const int64_t *tables, int64_t table_stride, const int64_t *lens,
                        int64_t item, int64_t H, int64_t n_kv, int64_t num_blocks, int64_t bs,
                        int64_t hd, int64_t longest, float scale, void *out, float *buf) {
    const int64_t g = H / n_kv;
    const int64_t d = item / n_kv, kvh = item % n_kv, len = lens[d], base = kvh * num_blocks;
    const int64_t blocks = (len + bs - 1) / bs;
    float *qf = buf, *row = qf + g * hd, *s = row + hd, *acc = s + g * longest;
    const int lanes = bf16 && hd % 16 == 0;
    const uint16_t *k16 = (const uint16_t *)kc, *v16 = (const uint16_t *)vc;
    for (int64_t j = 0; j < g; j++)
        row_to_float(q, bf16, (d * H + kvh * g + j) * hd, hd, qf + j * hd);
    const int64_t *table = tables + d * table_stride;
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t at0 = BLOCK_AT(b), rows = BLOCK_ROWS(b);
        if (b == 0 && blocks > 1) prefetch_block(kc, bf16, BLOCK_AT(1), BLOCK_ROWS(1), hd);
        if (b + 2 < blocks) prefetch_block(kc, bf16, BLOCK_AT(b + 2), BLOCK_ROWS(b + 2), hd);
        for (int64_t o = 0, t = b * bs; o < rows; o++, t++) {
            const int64_t at = at0 + o * hd;
            if (lanes) {
                for (int64_t j = 0; j < g; j++) {
                    lanes16_t dot = lanes_zero();
                    for (int64_t i = 0; i < hd; i += 16)
                        dot = lanes_fma(lanes_f32(qf + j * hd + i), lanes_bf16(k16 + at + i),
                                        dot);
                    s[j * longest + t] = lanes_sum(dot) * scale;
                }
                continue;
            }
            row_to_float(kc, bf16, at, hd, row);
            for (int64_t j = 0; j < g; j++) {
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t i = 0; i < hd; i++) dot += qf[j * hd + i] * row[i];
                s[j * longest + t] = dot * scale;
            }
        }
    }
    prefetch_block(vc, bf16, BLOCK_AT(0), BLOCK_ROWS(0), hd);
    float total[64]; /* g <= 64: checked by the caller */
    for (int64_t j = 0; j < g; j++) {
        float m = s[j * longest];
        for (int64_t t = 1; t < len; t++) m = s[j * longest + t] > m ? s[j * longest + t] : m;
        float sum = 0.0f;
        for (int64_t t = 0; t < len; t++) {
            float p = expf(s[j * longest + t] - m);
            s[j * longest + t] = p;
            sum += p;
        }
        total[j] = sum;
    }
    if (lanes) {  /* 16 lanes of up to ATTEND_HEADS heads in registers over all positions */
        for (int64_t i = 0; i < hd; i += 16)
            for (int64_t j0 = 0; j0 < g; j0 += ATTEND_HEADS) {
                const int64_t nj = g - j0 < ATTEND_HEADS ? g - j0 : ATTEND_HEADS;
                lanes16_t a[ATTEND_HEADS];
                for (int64_t j = 0; j < ATTEND_HEADS; j++) a[j] = lanes_zero();
                for (int64_t b = 0; b < blocks; b++) {
                    const int64_t at0 = BLOCK_AT(b), rows = BLOCK_ROWS(b);
                    if (i == 0 && j0 == 0 && b + 1 < blocks)
                        prefetch_block(vc, bf16, BLOCK_AT(b + 1), BLOCK_ROWS(b + 1), hd);
                    for (int64_t o = 0, t = b * bs; o < rows; o++, t++) {
                        const lanes16_t v = lanes_bf16(v16 + at0 + o * hd + i);
                        for (int64_t j = 0; j < nj; j++)
                            a[j] = lanes_fma(lanes_set1(s[(j0 + j) * longest + t]), v, a[j]);
                    }
                }
                for (int64_t j = 0; j < nj; j++) lanes_store(acc + (j0 + j) * hd + i, a[j]);
            }
    } else {  /* row by row into acc */
        for (int64_t i = 0; i < g * hd; i++) acc[i] = 0.0f;
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t at0 = BLOCK_AT(b), rows = BLOCK_ROWS(b);
            if (b + 1 < blocks) prefetch_block(vc, bf16, BLOCK_AT(b + 1), BLOCK_ROWS(b + 1), hd);
            for (int64_t o = 0, t = b * bs; o < rows; o++, t++) {
                row_to_float(vc, bf16, at0 + o * hd, hd, row);
                for (int64_t j = 0; j < g; j++) {
                    const float p = s[j * longest + t];
#pragma omp simd
                    for (int64_t i = 0; i < hd; i++) acc[j * hd + i] += p * row[i];
                }
            }
        }
    }
    for (int64_t j = 0; j < g; j++) {
        const int64_t o = (d * H + kvh * g + j) * hd;
        const float inv = 1.0f / total[j];
        for (int64_t i = 0; i < hd; i++) {
            const float v = acc[j * hd + i] * inv;
            if (bf16)
                ((uint16_t *)out)[o + i] = float_to_bf16(v);
            else
                ((float *)out)[o + i] = v;
        }
    }
}
#undef BLOCK_AT
#undef BLOCK_ROWS

#endif
