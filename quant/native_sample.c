/* The engine's sampler, its first draw in one call (server/sampling.py `_draw` and
 * fanformer/generate.py `sample_next` give the maths): per row, the logits over the
 * temperature, their weights exp(x - max), min-p, one draw by inverting the cumulative
 * weights in token id order, and whether that token lies outside the row's top-p nucleus
 * (then server/sampling.py draws that row again from its nucleus, in torch).
 *
 * Why in C: in torch the same pass is a dozen full-vocabulary ops per batch (a division, an
 * exp, a sequential cumsum, a masked sum, ...), 6 ms for 16 rows and 22 ms for 64 rows of a
 * 32k vocabulary on 2 cores, against a 25-90 ms decode step. Here each row is four passes
 * over buffers that stay in the core's L2.
 *
 * Numerics: the division, maximum, subtraction and comparisons are torch's (IEEE fp32). The
 * exp is our own polynomial (Cephes' expf: within about 1 ulp of torch's), and the sums
 * are taken in double in a fixed order of 8 lanes per chunk of CHUNK tokens where torch's
 * cumsum adds one token at a time in double; so a draw can differ from torch's only when
 * its uniform falls within a few ulp of a token's cumulative weight. Every row is computed
 * the same way whatever the other rows, threads and build (the loops are written per lane,
 * so the AVX2 and AVX-512 builds vectorize the same operations): a row gives the same bits
 * alone and in a batch.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 8
#define CHUNK 256 /* tokens per partial sum of the cumulative weights */

/* 8 lanes as GCC vector types, one ymm: the same operations in both builds (a * b + c is
 * contracted to an FMA in both: -mfma), so the same bits */
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef uint16_t vh __attribute__((vector_size(16)));
typedef float vf4 __attribute__((vector_size(16)));
typedef double vd4 __attribute__((vector_size(32)));

static inline vf splat(float a) { return (vf){0} + a; }
static inline vf pick(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

static inline vf load16(const void *row, int bf16, int64_t i) {
    if (bf16) {
        vh h;
        memcpy(&h, (const uint16_t *)row + i, sizeof h);
        return (vf)(__builtin_convertvector(h, vu) << 16);
    }
    vf v;
    memcpy(&v, (const float *)row + i, sizeof v);
    return v;
}

/* the 8 lanes added, widened, to two 4-lane double accumulators */
static inline void add_double(vd4 acc[2], vf v) {
    vf4 lo = {v[0], v[1], v[2], v[3]}, hi = {v[4], v[5], v[6], v[7]};
    acc[0] += __builtin_convertvector(lo, vd4);
    acc[1] += __builtin_convertvector(hi, vd4);
}

static inline double sum_double(const vd4 acc[2]) {
    double s = 0.0;
    for (int j = 0; j < 4; j++) s += acc[0][j];
    for (int j = 0; j < 4; j++) s += acc[1][j];
    return s;
}

/* exp(x) for -inf <= x <= 0, not NaN (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, a
 * polynomial in r, times 2^n); 0 below -87.3, where fp32 normals end. */
static inline vf exp_nonpositive(vf x) {
    const vi under = x < splat(-87.33654f);
    const vf xc = pick(under, splat(-87.33654f), x);
    const vf n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round */
    vf r = n * -0.693359375f + xc;
    r = n * 2.12194440e-4f + r;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const vf scale = (vf)((__builtin_convertvector(n, vi) + 127) << 23);
    return (vf)((vi)(p * scale) & ~under);
}

static inline float exp1(float x) { return exp_nonpositive(splat(x))[0]; }

static inline float load1(const void *row, int bf16, int64_t i) {
    if (bf16) {
        uint32_t u = (uint32_t)((const uint16_t *)row)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float *)row)[i];
}

/* One row: x and w are this thread's (V) buffers, sums its (V / CHUNK + 1) buffer. */
static void sample_row(const void *row, int bf16, int64_t V, float temperature, float floor,
                       float top_p, float u, float *x, float *w, double *sums, int64_t *token,
                       int8_t *status) {
    /* pass 1: x = logits / T, their maximum, and whether any is NaN */
    vf best = splat(-INFINITY);
    vi nan = (vi){0};
    int64_t i = 0;
    for (; i + LANES <= V; i += LANES) {
        vf v = load16(row, bf16, i) / temperature;
        memcpy(x + i, &v, sizeof v);
        best = pick(v > best, v, best);
        nan |= v != v;
    }
    float top = -INFINITY;
    int any_nan = 0;
    for (int j = 0; j < LANES; j++) top = best[j] > top ? best[j] : top, any_nan |= nan[j];
    for (; i < V; i++) {
        x[i] = load1(row, bf16, i) / temperature;
        top = x[i] > top ? x[i] : top;
        any_nan |= x[i] != x[i];
    }
    if (any_nan || !isfinite(top)) { /* torch's weights are NaN there: no draw */
        *token = 0;
        *status = 0;
        return;
    }
    const float cut = top + floor; /* min-p drops x < cut; -inf when it is off */

    /* pass 2: the weights w = exp(x - top); per chunk the sum of the kept ones, and the sum
     * of all of them (top-p reads the distribution before min-p) */
    const int64_t chunks = (V + CHUNK - 1) / CHUNK;
    vd4 all[2] = {{0}, {0}};
    double all_d = 0.0;
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t lo = c * CHUNK, hi = lo + CHUNK < V ? lo + CHUNK : V;
        vd4 kept[2] = {{0}, {0}};
        double s = 0.0;
        for (i = lo; i + LANES <= hi; i += LANES) {
            vf v;
            memcpy(&v, x + i, sizeof v);
            const vf e = exp_nonpositive(v - top);
            memcpy(w + i, &e, sizeof e);
            add_double(all, e);
            add_double(kept, (vf)((vi)e & (v >= cut)));
        }
        for (; i < hi; i++) {
            w[i] = exp1(x[i] - top);
            all_d += (double)w[i];
            s += x[i] < cut ? 0.0 : (double)w[i];
        }
        sums[c] = sum_double(kept) + s;
    }
    double total_d = 0.0;
    for (int64_t c = 0; c < chunks; c++) total_d += sums[c];
    all_d += sum_double(all);
    const float total = (float)total_d;
    if (!(isfinite(total) && total > 0.0f)) { /* nothing kept (every token under min-p) */
        *token = 0;
        *status = 0;
        return;
    }

    /* pass 3: the first token whose cumulative kept weight exceeds u x total (u * total can
     * round up to total: the last kept token must stay reachable) */
    float target = u * total;
    const float below = nextafterf(total, 0.0f);
    target = target < below ? target : below;
    double run = 0.0;
    int64_t c = 0;
    while (c < chunks - 1 && (float)(run + sums[c]) <= target) run += sums[c++];
    int64_t t = -1, last = -1;
    for (i = c * CHUNK; i < V; i++) {
        if (x[i] < cut || w[i] == 0.0f) continue;
        last = i;
        run += (double)w[i];
        if ((float)run > target) {
            t = i;
            break;
        }
    }
    if (t < 0) /* the lane-order chunk sums overshot the token-order ones by rounding */
        t = last >= 0 ? last : V - 1;
    *token = t;

    /* pass 4: outside the nucleus when the tokens likelier than it weigh top_p or more */
    *status = 1;
    const float wt = w[t];
    if (top_p < 1.0f && wt < 1.0f) {
        vd4 above[2] = {{0}, {0}};
        const vf line = splat(wt);
        for (i = 0; i + LANES <= V; i += LANES) {
            vf v;
            memcpy(&v, w + i, sizeof v);
            add_double(above, (vf)((vi)v & (v > line)));
        }
        double a = sum_double(above);
        for (; i < V; i++) a += w[i] > wt ? (double)w[i] : 0.0;
        if ((float)a >= top_p * (float)all_d) *status = 2;
    }
}

/* logits (R, V) fp32 or bf16 (bf16 != 0), rows `stride` elements apart; per row its
 * temperature (> 0), min-p floor log(min_p) (-inf: off), top_p and uniform -> token ids
 * (R) and a status per row: 0 = no finite weight to draw from, 1 = drawn, 2 = drawn but
 * outside the nucleus (draw it again from the nucleus with the row's second uniform).
 * Returns 0, or -1 when the workspace cannot be allocated. */
int fanformer_sample_rows(const void *logits, int bf16, int64_t R, int64_t V, int64_t stride,
                          const float *temperature, const float *floor, const float *top_p,
                          const float *uniform, int64_t *tokens, int8_t *status,
                          int nthreads) {
    int failed = 0;
    const size_t elem = bf16 ? 2 : 4;
#pragma omp parallel num_threads(nthreads)
    {
        float *x = (float *)malloc(sizeof(float) * 2 * (size_t)V);
        double *sums = (double *)malloc(sizeof(double) * (size_t)(V / CHUNK + 1));
        if (!x || !sums) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            if (!x || !sums) continue;
            sample_row((const char *)logits + (size_t)(r * stride) * elem, bf16, V,
                       temperature[r], floor[r], top_p[r], uniform[r], x, x + V, sums,
                       tokens + r, status + r);
        }
        free(x);
        free(sums);
    }
    return failed ? -1 : 0;
}
