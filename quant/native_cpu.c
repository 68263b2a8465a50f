/* The native CPU kernels: a quantized linear (4- or 8-bit weights x int8 activations on
 * AVX-512 VNNI; AVX2: 4-bit), one call per linear, and decode attention over the engine's
 * paged KV cache (at the end of the file). Both batch-invariant.
 *
 * y (M, N) = x (M, K) @ W.T, W[n, k] = (code[n, k] - zero[g, n]) * scale[g, n], g = k / gs,
 * codes unsigned (4-bit: 0..15; 8-bit: symmetric int8 weights + 128, zero 128).
 * Each row of x is quantized to int8 per group of gs inputs (its own absmax grid, as
 * llama.cpp's q8 activations are), so within a group the products are exact int32 sums
 * (VPDPBUSD: unsigned codes times signed 8-bit activations); per group:
 *     y += a_scale[m, g] * (scale[g, n] * dot + minus_zs[g, n] * a_sum[m, g])
 * with minus_zs = -zero * scale and a_sum the group's activation code sum. A row's result
 * is computed by the same instructions in the same order whatever the number of rows and
 * threads, so it is bitwise the same alone and in a batch.
 *
 * Packed layout (built by quant/native_cpu.py): channel blocks of 16; for block b and each
 * 8 inputs k8, 64 bytes = 16 channels x 4 bytes; byte i of channel j holds the code of
 * input 8*k8 + i in its low nibble and of input 8*k8 + 4 + i in its high nibble. One
 * 64-byte load gives two VPDPBUSD operands of 16 channels x 4 inputs each.
 *
 * Two builds of this file (quant/native_cpu.py picks one by the CPU's flags): with
 * FANFORMER_AVX512, VPDPBUSD on 512 bits (AVX-512 VNNI); without, AVX2 (VPMADDUBSW then
 * VPMADDWD: code 15 x activation 127 x 2 fits int16, so it never saturates). Both compute
 * the same int32 sums and the same fp32 epilogue in the same order: the same bits.
 * Built at run time by quant/native_cpu.py (gcc, -fopenmp); loaded after torch, so the
 * OpenMP runtime is torch's own libgomp and the threads are its pool.
 */
#include "native_kernels.h"

/* x (M, K) fp32 or bf16 (bf16 != 0), y (M, N) in the same dtype. packed: (Np / 16) blocks
 * of K * 16 * bits / 8 bytes (4-bit: the nibble layout above; 8-bit: per 4 inputs, 16
 * channels x 4 bytes of unsigned codes); scale, minus_zs: (K / gs, Np) fp32, Np = N rounded
 * up to 16, the padding channels zero. K must be a multiple of gs and gs of 16. Returns 0,
 * -1 when the workspace cannot be allocated, -2 for weights this build has no path for
 * (8-bit on AVX2, where VPMADDUBSW would saturate on codes up to 255). */
int fanformer_wq_linear(const void *x, int bf16, int64_t M, int64_t K, int bits,
                        const uint8_t *packed, const float *scale, const float *minus_zs,
                        int64_t N, int64_t Np, int64_t gs, void *y, int nthreads) {
#ifdef FANFORMER_AVX512
    if (bits != 4 && bits != 8) return -2;
#else
    if (bits != 4) return -2;
#endif
    const int64_t G = K / gs;
    int8_t *q = (int8_t *)malloc((size_t)(M * K));
    float *a_scale = (float *)malloc(sizeof(float) * (size_t)(M * G));
    float *a_sum = (float *)malloc(sizeof(float) * (size_t)(M * G));
    if (!q || !a_scale || !a_sum) {
        free(q); free(a_scale); free(a_sum);
        return -1;
    }
    team_barrier_t bar = TEAM_BARRIER_INIT;
#pragma omp parallel num_threads(nthreads)
    {
        team_t t = team_join(&bar);
        wq_linear_rows(&t, x, bf16, M, K, bits, packed, scale, minus_zs, N, Np, gs, y, q,
                       a_scale, a_sum);
    }
    free(q); free(a_scale); free(a_sum);
    return 0;
}

/* y (M, N) bf16 = x (M, K) bf16 @ w.T (+ bias (N) bf16, or NULL), w (N, K) bf16 row-major,
 * K a multiple of 16: native_kernels.h's bf16 linear, the one the fused decode step runs on
 * bf16 weights, alone (for tests and the benches' linear-only figures). Returns 0. */
int fanformer_bf16_linear(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w,
                          const uint16_t *bias, int64_t N, uint16_t *y, int nthreads) {
    team_barrier_t bar = TEAM_BARRIER_INIT;
#pragma omp parallel num_threads(nthreads)
    {
        team_t t = team_join(&bar);
        dense_linear_rows(&t, x, M, K, w, bias, N, y);
    }
    return 0;
}

/* ---- decode attention over a paged KV cache (the engine's, server/kv_cache.py) ----
 *
 * For each decode row d and query head h (kv head h / (H / n_kv)): softmax(q . k * scale)
 * . v over the row's first len[d] positions, read in place from the layer's blocks
 * (kc, vc: (n_kv, num_blocks, bs, hd)) through the row's block table: no gather, no
 * padding, no mask. fp32 scores, softmax and sums; q, K/V and out bf16 (bf16 != 0) or
 * fp32. A (row, kv head) pair is computed the same way whatever the other rows are: the
 * result is batch-invariant. Returns 0, or -1 when the workspace cannot be allocated. */
int fanformer_paged_decode(const void *q, const void *kc, const void *vc, int bf16,
                           const int64_t *tables, int64_t table_stride, const int64_t *lens,
                           int64_t D, int64_t H, int64_t n_kv, int64_t num_blocks, int64_t bs,
                           int64_t hd, float scale, void *out, int nthreads) {
    const int64_t g = H / n_kv;
    int64_t longest = 1;
    for (int64_t d = 0; d < D; d++) longest = lens[d] > longest ? lens[d] : longest;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        /* per thread: q (g, hd), one K/V row, scores (g, longest), sums (g, hd) */
        float *buf = (float *)malloc(sizeof(float) * (size_t)(g * hd + hd + g * longest + g * hd));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < D * n_kv; item++) {
            if (!buf) continue;
            attend_item(q, kc, vc, bf16, tables, table_stride, lens, item, H, n_kv, num_blocks,
                        bs, hd, longest, scale, out, buf);
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
