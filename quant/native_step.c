/* The decode step of a bf16 FANformer in C, for R rows of one token each (server/
 * native_step.py). Fused (`fanformer_decode_step`): every block of a model whose every
 * projection is a native quantized linear or a bf16 linear (native_kernels.h), in one call
 * and one OpenMP region. Phased (`fanformer_block_phase`): the elementwise phases between
 * projections, one call each, for any other bf16 model (nf4, ...), whose projections torch
 * runs in between.
 *
 * Why: a one-row step in eager PyTorch is ~2,000 small aten calls around 61 linears
 * (docs/ENGINE.md "The native decode step"). Here each block is the same sequence of the
 * same kernels (native_kernels.h: the quantized linear, the paged decode attention) with the
 * elementwise work between them done in place, and the fused step wakes its threads once
 * per step instead of once per op.
 *
 * The block (fanformer/model.py `Block`, eval mode): HybridNorm* or pre-norm, the FAN layer,
 * CoLA or dense projections, per-head QKV norms, RoPE (rotate-half), paged GQA attention,
 * gated residuals, SwiGLU. Every op rounds to bf16 where the eager bf16 model rounds (each
 * aten op computes in fp32 and rounds its result), so the two agree to bf16 rounding; they
 * are not bitwise equal (RMSNorm's sum order, expf and cosf against torch's vectorized
 * ones). Each row is computed alone: the result does not depend on the other rows.
 * The Python side (server/native_step.py) builds the descriptors and checks every shape.
 */

#include "native_kernels.h"

typedef struct {  /* one linear: quantized in native_cpu.c's layout (bits 4 or 8), or a bf16
                   * nn.Linear's own (N, K) weight in `packed` (bits 16, native_kernels.h) */
    const uint8_t *packed;
    const float *scale, *minus_zs;  /* (K / gs, Np) */
    const uint16_t *bias;           /* (N) bf16, or NULL */
    const int64_t *perm;            /* (K): act-order GPTQ reads x[perm], or NULL */
    const uint16_t *in_scale;       /* (K) bf16: AWQ's 1 / s, multiplied in first, or NULL */
    int64_t K, N, Np, gs, bits;
} linear_t;

typedef struct {  /* a projection: a(x), or with cola: b(silu(a(x))) */
    linear_t a, b;
    int64_t cola;
} proj_t;

typedef struct {
    proj_t fan, qkv, o, gate, up, down;
    const uint16_t *attn_norm, *ffn_norm;       /* (d) RMSNorm gains; attn_norm may be NULL */
    const uint16_t *q_norm, *k_norm, *v_norm;   /* (hd) QKV-norm gains, or NULL */
    const uint16_t *attn_gate, *ffn_gate;       /* (d) sigmoid(gate) in bf16, or NULL */
    void *kc, *vc;                              /* the layer's (n_kv, num_blocks, bs, hd) */
    int64_t fan_periodic;                       /* cos/sin width of the FAN layer; 0: none */
    int64_t prenorm_ffn;                        /* residual of the FFN: y (1) or Norm(y) (0) */
} layer_t;

typedef struct {
    int64_t R, d, H, n_kv, hd, n_layers, num_blocks, bs, table_stride;
    int64_t max_width;  /* the widest linear input or output, for the scratch rows */
    float eps, scale;   /* RMSNorm epsilon, attention scale */
    const uint16_t *cos, *sin;   /* (R, hd / 2) bf16: each row's RoPE tables */
    const int64_t *write_index;  /* (R): block * bs + offset of each row's new token */
    const int64_t *tables, *lens;  /* (R, table_stride) block ids; (R) positions to attend */
} step_t;

static inline uint16_t round_bf16(float f) { return float_to_bf16(f); }
static inline float bf(uint16_t h) { return bf16_to_float(h); }

/* out (n) = bf16(x * rsqrt(mean(x^2) + eps) * w): torch's bf16 RMSNorm */
static void rms_norm(const uint16_t *x, const uint16_t *w, int64_t n, float eps, uint16_t *out) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) ss += bf(x[i]) * bf(x[i]);
    const float rstd = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = round_bf16(bf(x[i]) * rstd * bf(w[i]));
}

static inline uint16_t silu_exact(uint16_t h) {
    const float v = bf(h);
    return round_bf16(v / (1.0f + expf(-v)));
}

/* SiLU of every bf16 value (128 KiB), filled from silu_exact when the library loads: a bf16
 * input has only 2^16 values, so a lookup gives the same bits as computing it, without the
 * libm expf per element that made the SwiGLU phase ~20 % of a 64-row step's linears. */
static uint16_t silu_table[1 << 16];

__attribute__((constructor)) static void fill_silu_table(void) {
    for (uint32_t h = 0; h < (1u << 16); h++) silu_table[h] = silu_exact((uint16_t)h);
}

static inline uint16_t silu_bf16(uint16_t h) { return silu_table[h]; }

typedef struct {  /* shared scratch of one call */
    uint16_t *xp, *mid;   /* (R, max_width): a linear's prepared input; CoLA's inner rows */
    int8_t *q8;           /* (R, max_width) activation codes */
    float *a_scale, *a_sum;  /* (R, max_width / 16) */
} scratch_t;

/* y (R, N) bf16 = linear(x (R, K) bf16); inside the parallel region */
static void run_linear(team_t *t, const linear_t *l, int64_t R, const uint16_t *x,
                       uint16_t *y, const scratch_t *w) {
    if (l->bits == 16) {  /* bias added before the one rounding, as F.linear adds it */
        dense_linear_rows(t, x, R, l->K, (const uint16_t *)l->packed, l->bias, l->N, y);
        return;
    }
    const uint16_t *in = x;
    if (l->perm || l->in_scale) {
        TEAM_FOR(t, m, R)
            for (int64_t k = 0; k < l->K; k++)
                w->xp[m * l->K + k] = l->perm ? x[m * l->K + l->perm[k]]
                                              : round_bf16(bf(x[m * l->K + k]) * bf(l->in_scale[k]));
        team_sync(t);
        in = w->xp;
    }
    wq_linear_rows(t, in, 1, R, l->K, (int)l->bits, l->packed, l->scale, l->minus_zs, l->N,
                   l->Np, l->gs, y, w->q8, w->a_scale, w->a_sum);
    if (l->bias) {
        TEAM_FOR(t, m, R)
            for (int64_t n = 0; n < l->N; n++)
                y[m * l->N + n] = round_bf16(bf(y[m * l->N + n]) + bf(l->bias[n]));
        team_sync(t);
    }
}

static void run_proj(team_t *t, const proj_t *p, int64_t R, const uint16_t *x, uint16_t *y,
                     const scratch_t *w) {
    if (!p->cola) {
        run_linear(t, &p->a, R, x, y, w);
        return;
    }
    run_linear(t, &p->a, R, x, w->mid, w);
    TEAM_FOR(t, i, R * p->a.N) w->mid[i] = silu_bf16(w->mid[i]);
    team_sync(t);
    run_linear(t, &p->b, R, w->mid, y, w);
}

/* q, k: (heads, hd) rotated in place by one row's cos/sin (hd / 2): rotate-half, each product
 * and sum rounded as torch's bf16 ops round them */
static void rope(uint16_t *x, int64_t heads, int64_t hd, const uint16_t *cos, const uint16_t *sin) {
    const int64_t half = hd / 2;
    for (int64_t h = 0; h < heads; h++) {
        uint16_t *v = x + h * hd;
        for (int64_t i = 0; i < half; i++) {
            const float x1 = bf(v[i]), x2 = bf(v[i + half]), c = bf(cos[i]), s = bf(sin[i]);
            const float r1 = bf(round_bf16(x1 * c)) - bf(round_bf16(x2 * s));
            const float r2 = bf(round_bf16(x2 * c)) + bf(round_bf16(x1 * s));
            v[i] = round_bf16(r1);
            v[i + half] = round_bf16(r2);
        }
    }
}

/* x + gate * branch, rounded as `x + sigmoid(gate).to(bf16) * branch` is */
static inline uint16_t gated_add(uint16_t x, const uint16_t *gate, int64_t i, uint16_t branch) {
    const float b = gate ? bf(round_bf16(bf(gate[i]) * bf(branch))) : bf(branch);
    return round_bf16(bf(x) + b);
}

/* The step's rows, bf16, row-major (R, width): the attention input h (d), the FAN features
 * xf (d), qkv ((H + 2 n_kv) hd), the rotated queries q (H hd), the attention output attn
 * (H hd), a projection's output a (d, or the FAN projection's d - p), the stream after
 * attention y (d), its norm n (d), the FFN's gate g and up u (d_ff), its output f (d). */
typedef struct {
    uint16_t *h, *xf, *qkv, *q, *attn, *a, *y, *n, *g, *u, *f;
} rows_t;

/* The elementwise phases of a block, between its projections. Their loops are orphaned
 * worksharing (as wq_linear_rows'): the fused step runs them inside its region, the phase
 * entry point (below) on its caller's thread or in a region of its own. */

static void attn_norm_rows(team_t *t, const layer_t *L, const step_t *s, const uint16_t *x,
                           rows_t *b) {
    TEAM_FOR(t, m, s->R) rms_norm(x + m * s->d, L->attn_norm, s->d, s->eps, b->h + m * s->d);
    team_sync(t);
}

/* X_F = [cos(P) | sin(P) | G] from the FAN projection's (R, d - p) output in b->a */
static void fan_features(team_t *t, const layer_t *L, const step_t *s, rows_t *b) {
    const int64_t d = s->d, p = L->fan_periodic, pg = d - p;
    TEAM_FOR(t, m, s->R) {
        const uint16_t *src = b->a + m * pg;
        uint16_t *dst = b->xf + m * d;
        for (int64_t i = 0; i < p; i++) {
            dst[i] = round_bf16(cosf(bf(src[i])));
            dst[p + i] = round_bf16(sinf(bf(src[i])));
        }
        memcpy(dst + 2 * p, src + p, sizeof(uint16_t) * (size_t)(pg - p));
    }
    team_sync(t);
}

/* qkv -> QKV norms, RoPE, k and v into the cache, q into b->q; then each (row, kv head)'s
 * attention over its blocks into b->attn. att_buf: this thread's attend_item scratch. */
static void attention(team_t *t, const layer_t *L, const step_t *s, rows_t *b,
                      float *att_buf, int64_t longest) {
    const int64_t R = s->R, H = s->H, n_kv = s->n_kv, hd = s->hd;
    const int64_t width = (H + 2 * n_kv) * hd;
    TEAM_FOR(t, m, R) {
        uint16_t *q = b->qkv + m * width, *k = q + H * hd, *v = k + n_kv * hd;
        if (L->q_norm) {
            for (int64_t h = 0; h < H; h++) rms_norm(q + h * hd, L->q_norm, hd, s->eps, q + h * hd);
            for (int64_t h = 0; h < n_kv; h++) {
                rms_norm(k + h * hd, L->k_norm, hd, s->eps, k + h * hd);
                rms_norm(v + h * hd, L->v_norm, hd, s->eps, v + h * hd);
            }
        }
        const uint16_t *c = s->cos + m * (hd / 2), *sn = s->sin + m * (hd / 2);
        rope(q, H, hd, c, sn);
        rope(k, n_kv, hd, c, sn);
        const int64_t slot = s->write_index[m];  /* block * bs + offset */
        for (int64_t h = 0; h < n_kv; h++) {
            const int64_t at = (h * s->num_blocks * s->bs + slot) * hd;
            memcpy((uint16_t *)L->kc + at, k + h * hd, sizeof(uint16_t) * (size_t)hd);
            memcpy((uint16_t *)L->vc + at, v + h * hd, sizeof(uint16_t) * (size_t)hd);
        }
        memcpy(b->q + m * H * hd, q, sizeof(uint16_t) * (size_t)(H * hd));  /* (R, H, hd) */
    }
    team_sync(t);
    TEAM_FOR(t, item, R * n_kv)
        attend_item(b->q, L->kc, L->vc, 1, s->tables, s->table_stride, s->lens, item, H, n_kv,
                    s->num_blocks, s->bs, hd, longest, s->scale, b->attn, att_buf);
    team_sync(t);
}

/* y = x + gate * a (the attention's output projection); n = Norm(y) */
static void attn_residual(team_t *t, const layer_t *L, const step_t *s, const uint16_t *x,
                          rows_t *b) {
    const int64_t d = s->d;
    TEAM_FOR(t, m, s->R) {
        for (int64_t i = 0; i < d; i++)
            b->y[m * d + i] = gated_add(x[m * d + i], L->attn_gate, i, b->a[m * d + i]);
        rms_norm(b->y + m * d, L->ffn_norm, d, s->eps, b->n + m * d);
    }
    team_sync(t);
}

/* g = SiLU(g) * u over (R, ff) */
static void swiglu(team_t *t, const step_t *s, int64_t ff, rows_t *b) {
    TEAM_FOR(t, i, s->R * ff) b->g[i] = round_bf16(bf(silu_bf16(b->g[i])) * bf(b->u[i]));
    team_sync(t);
}

/* x = residual + gate * f, the residual y (pre-norm FFN) or n (post-norm) */
static void ffn_residual(team_t *t, const layer_t *L, const step_t *s, uint16_t *x,
                         const rows_t *b) {
    const int64_t d = s->d;
    const uint16_t *residual = L->prenorm_ffn ? b->y : b->n;
    TEAM_FOR(t, m, s->R)
        for (int64_t i = 0; i < d; i++)
            x[m * d + i] = gated_add(residual[m * d + i], L->ffn_gate, i, b->f[m * d + i]);
    team_sync(t);
}

static int64_t longest_row(const step_t *s) {
    int64_t longest = 1;
    for (int64_t m = 0; m < s->R; m++) longest = s->lens[m] > longest ? s->lens[m] : longest;
    return longest;
}

static int64_t attend_floats(const step_t *s, int64_t longest) {  /* attend_item's scratch */
    const int64_t g = s->H / s->n_kv;
    return 2 * g * s->hd + s->hd + g * longest;
}

/* One block, every projection on the native quantized linear, inside the step's region */
static void block(team_t *t, const layer_t *L, const step_t *s, uint16_t *x, rows_t *b,
                  const scratch_t *w, float *att_buf, int64_t longest) {
    const uint16_t *in = x;
    if (L->attn_norm) {
        attn_norm_rows(t, L, s, x, b);
        in = b->h;
    }
    if (L->fan_periodic) {
        run_proj(t, &L->fan, s->R, in, b->a, w);  /* (R, d - p): P | G */
        fan_features(t, L, s, b);
        in = b->xf;
    }
    run_proj(t, &L->qkv, s->R, in, b->qkv, w);  /* (R, (H + 2 n_kv) hd): q | k | v */
    attention(t, L, s, b, att_buf, longest);
    run_proj(t, &L->o, s->R, b->attn, b->a, w);  /* (R, d) */
    attn_residual(t, L, s, x, b);
    run_proj(t, &L->gate, s->R, b->n, b->g, w);
    run_proj(t, &L->up, s->R, b->n, b->u, w);
    swiglu(t, s, L->gate.cola ? L->gate.b.N : L->gate.a.N, b);
    run_proj(t, &L->down, s->R, b->g, b->f, w);
    ffn_residual(t, L, s, x, b);
}

/* The fused step. x (R, d) bf16: the rows' embeddings in, the last block's output (before
 * the final norm) out. Returns 0, or -1 when the workspace cannot be allocated. */
int fanformer_decode_step(const layer_t *layers, const step_t *s, uint16_t *x, int nthreads) {
    const int64_t R = s->R, W = s->max_width, longest = longest_row(s);
    const int64_t att_floats = attend_floats(s, longest);
    const size_t rows = (size_t)(R * W);
    uint16_t *mem = (uint16_t *)malloc(sizeof(uint16_t) * rows * 13);
    int8_t *q8 = (int8_t *)malloc(rows);
    float *fl = (float *)malloc(sizeof(float) * ((size_t)(2 * R * (W / 16 + 1)) +
                                                 (size_t)(nthreads * att_floats)));
    if (!mem || !q8 || !fl) {
        free(mem); free(q8); free(fl);
        return -1;
    }
    rows_t b;
    uint16_t **slots[] = {&b.h, &b.xf, &b.qkv, &b.q, &b.attn, &b.a, &b.y, &b.n, &b.g, &b.u, &b.f};
    for (size_t i = 0; i < sizeof(slots) / sizeof(slots[0]); i++) *slots[i] = mem + i * rows;
    scratch_t w = {mem + 11 * rows, mem + 12 * rows, q8, fl, fl + R * (W / 16 + 1)};
    float *att = fl + 2 * R * (W / 16 + 1);
    team_barrier_t bar = TEAM_BARRIER_INIT;
#pragma omp parallel num_threads(nthreads)
    {
        team_t t = team_join(&bar);
        float *mine = att + t.tid * att_floats;
        for (int64_t l = 0; l < s->n_layers; l++) block(&t, &layers[l], s, x, &b, &w, mine, longest);
    }
    free(mem); free(q8); free(fl);
    return 0;
}

/* One phase of fanformer_block_phase, by the team t. */
static void run_phase(team_t *t, int phase, const layer_t *L, const step_t *s, uint16_t *x,
                      rows_t *b, int64_t ff, float *att_buf, int64_t longest) {
    switch (phase) {
    case 0: attn_norm_rows(t, L, s, x, b); break;
    case 1: fan_features(t, L, s, b); break;
    case 2: attention(t, L, s, b, att_buf, longest); break;
    case 3: attn_residual(t, L, s, x, b); break;
    case 4: swiglu(t, s, ff, b); break;
    case 5: ffn_residual(t, L, s, x, b); break;
    }
}

/* The phases one by one, for a step whose projections torch runs (bf16 weights, or any
 * layer without a native kernel: server/native_step.py calls the modules in between, so
 * their bits are the eager model's). phase: 0 attn norm (x -> h), 1 FAN features (a -> xf),
 * 2 attention (qkv -> cache, attn), 3 attention residual (x, a -> y, n), 4 SwiGLU (g, u ->
 * g, width ff), 5 FFN residual (y or n, f -> x); on nthreads (1: the calling thread alone,
 * which the caller asks for the elementwise phases of a few rows, where waking the team
 * costs more than it saves). Each row's bits are the same either way. Returns 0, -1 when
 * the attention's workspace cannot be allocated, -2 for an unknown phase. */
int fanformer_block_phase(int phase, const layer_t *L, const step_t *s, uint16_t *x,
                          rows_t *b, int64_t ff, int nthreads) {
    if (phase < 0 || phase > 5) return -2;
    int64_t longest = 1, att_floats = 0;
    float *att = NULL;
    if (phase == 2) {
        longest = longest_row(s);
        att_floats = attend_floats(s, longest);
        att = (float *)malloc(sizeof(float) * (size_t)(nthreads * att_floats));
        if (!att) return -1;
    }
    if (nthreads == 1) {
        team_t solo = TEAM_SOLO;
        run_phase(&solo, phase, L, s, x, b, ff, att, longest);
    } else {
        team_barrier_t bar = TEAM_BARRIER_INIT;
#pragma omp parallel num_threads(nthreads)
        {
            team_t t = team_join(&bar);
            run_phase(&t, phase, L, s, x, b, ff, att ? att + t.tid * att_floats : NULL,
                      longest);
        }
    }
    free(att);
    return 0;
}
