/* The whole stack of transformer blocks of a few-row forward step as one native call.
 *
 * Built into the AVX2 library beside native_avx2.c, whose products it calls. `model.forward`
 * gives it the embedded tokens x [R, H] (fp32, R = B * T rows, row r = b * T + t) and takes back
 * the final hidden states (after the final norm, and PanGu-α's query layer): every block's
 * norms, projections, RoPE, cache writes, attention, MLP and residuals run here, in fp32, with
 * keys and values stored in the cache's dtype (fp32 or bf16) and read back from it, as the
 * PyTorch blocks do. Row r of batch row b sits at position pos[r]: it writes cache slot pos[r]
 * and attends to slots 0 .. pos[r] (the causal rule of `model._mask`).
 *
 * Plain C for everything but the products: a step's elementwise work is R x H values. The
 * whole step is one OpenMP parallel region: the products and attention share their rows among
 * the threads (the team code of native_avx2.c), the elementwise parts run on one thread
 * (`single`), and the threads wait at barriers between parts instead of falling asleep between
 * parallel regions (waking them cost as much as a third of an fp32 GPT-2-small step). The
 * caller (native_step.py) checks every pointer and size first; this code trusts them.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define X_BF16 1
#define S_BF16 2
#define B_BF16 4
#define X_Q16 8

/* native_avx2.c's products as team code (every thread of the team calls them). */
int pangu_avx2_int8_team(const void *x, const int8_t *w, const void *scales, const void *bias, void *y,
                         int64_t m_total, int64_t n_total, int64_t k_total, int flags);
int pangu_avx2_int4_team(const void *x, const uint8_t *q, const void *scales, const uint8_t *zeros,
                         const void *bias, void *y, int64_t m_total, int64_t n_total, int64_t k_total,
                         int64_t group, int flags);
int pangu_avx2_int4t_team(const void *x, const uint8_t *tiles, const void *scales, const uint8_t *zeros,
                          const void *bias, void *y, int64_t m_total, int64_t n_total, int64_t k_total,
                          int64_t group, int flags);
int pangu_avx2_bf16_team(const void *x, const uint16_t *w, const void *bias, void *y, int64_t m_total,
                         int64_t n_total, int64_t k_total, int flags);
int pangu_avx2_f32_team(const float *x, const float *w, const void *bias, float *y, int64_t m_total,
                        int64_t n_total, int64_t k_total, int flags);
int pangu_avx2_f32t_team(const float *x, const float *wt, const void *bias, float *y, int64_t m_total,
                         int64_t n_total, int64_t k_total, int flags);

enum { LIN_NONE, LIN_F32, LIN_F32T, LIN_BF16, LIN_INT8, LIN_INT4, LIN_INT4T };
enum { ACT_GELU_TANH, ACT_GELU, ACT_FAST_GELU, ACT_SILU };

/* One linear: y [M, n] = x [M, k] W.T + bias. LIN_F32T: `w` is W.T, [k, n] row-major; LIN_INT4T:
 * `w` is AVX2 tiles (quant/packing.py). `reduce`
 * (tensor parallelism, a row-parallel weight): the product is summed over the ranks by the
 * model's `reduce` callback before the bias is added. */
typedef struct {
    int32_t kind, flags, reduce, pad; /* flags: S_BF16 (scales), B_BF16 (bias) */
    int64_t n, k, group;
    const void *w, *scales, *zeros, *bias;
} lin_t;

typedef struct {
    const void *w, *b; /* [H]; b NULL for RMSNorm or no bias */
    int32_t bf16;      /* w and b are bf16 (else fp32) */
} norm_t;

typedef struct {
    norm_t attn_norm, mlp_norm;
    lin_t q, k, v, qkv, o, gate, up, gate_up, down; /* qkv / gate_up: fused (then q, k, v / gate, up unused) */
    int64_t heads, kv_heads;
} block_t;

typedef struct {
    int64_t hidden, head_dim, layers, rope_rows; /* layers: blocks, then the query layer if any */
    int32_t rms, act, swiglu, query_layer, cache_bf16, query_bf16, rope_bf16;
    float eps;
    const void *rope_cos, *rope_sin; /* [rope_rows, head_dim] (bf16 with rope_bf16, else fp32), or NULL: no RoPE */
    const void *query_embed;          /* [positions, hidden] (PanGu-α), in the compute dtype */
    int (*reduce)(float *y, int64_t n); /* sums y [n] over the ranks in place (0: done); NULL without them */
    const block_t *blocks;            /* [layers] */
    norm_t final_norm;
} model_t;

static inline float bf(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf(float f) { /* round to nearest even, as torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x7FFFFFu)) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float ld(const void *p, int64_t i, int bf16) {
    return bf16 ? bf(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* y [M, n] fp32 = x [M, k] fp32 through the linear's kernel (team code). */
static int product(const lin_t *L, const float *x, float *y, int64_t m, const void *bias) {
    const int f = L->flags;
    switch (L->kind) {
        case LIN_F32: return pangu_avx2_f32_team(x, L->w, bias, y, m, L->n, L->k, f);
        case LIN_F32T: return pangu_avx2_f32t_team(x, L->w, bias, y, m, L->n, L->k, f);
        case LIN_BF16: return pangu_avx2_bf16_team(x, L->w, bias, y, m, L->n, L->k, f);
        case LIN_INT8: return pangu_avx2_int8_team(x, L->w, L->scales, bias, y, m, L->n, L->k, f | X_Q16);
        case LIN_INT4:
            return pangu_avx2_int4_team(x, L->w, L->scales, L->zeros, bias, y, m, L->n, L->k, L->group, f | X_Q16);
        case LIN_INT4T:
            return pangu_avx2_int4t_team(x, L->w, L->scales, L->zeros, bias, y, m, L->n, L->k, L->group, f);
    }
    return -1;
}

/* The product; for a row-parallel weight then (once every thread is done) the sum over the
 * ranks on thread 0, which called the step, and the bias, once. */
static int linear(const model_t *md, const lin_t *L, const float *x, float *y, int64_t m) {
    if (!L->reduce) return product(L, x, y, m, L->bias);
    int failed = product(L, x, y, m, NULL);
    int reduced = 0;
#pragma omp barrier
#pragma omp master
    {
        reduced = md->reduce(y, m * L->n) == 0;
        for (int64_t i = 0; reduced && L->bias != NULL && i < m * L->n; i++)
            y[i] += ld(L->bias, i % L->n, L->flags & B_BF16);
    }
    return failed | (omp_get_thread_num() == 0 && !reduced);
}

/* out [M, H] = norm(x [M, H]) in fp32. */
static void norm(const model_t *md, const norm_t *nm, const float *x, float *out, int64_t m) {
    const int64_t h = md->hidden;
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * h;
        float *o = out + r * h;
        if (md->rms) {
            double ss = 0.0;
            for (int64_t i = 0; i < h; i++) ss += (double)xr[i] * xr[i];
            float inv = 1.0f / sqrtf((float)(ss / h) + md->eps);
            for (int64_t i = 0; i < h; i++) o[i] = xr[i] * inv * ld(nm->w, i, nm->bf16);
        } else {
            double s = 0.0, ss = 0.0;
            for (int64_t i = 0; i < h; i++) s += xr[i];
            float mean = (float)(s / h);
            for (int64_t i = 0; i < h; i++) ss += (double)(xr[i] - mean) * (xr[i] - mean);
            float inv = 1.0f / sqrtf((float)(ss / h) + md->eps);
            for (int64_t i = 0; i < h; i++)
                o[i] = (xr[i] - mean) * inv * ld(nm->w, i, nm->bf16) + (nm->b ? ld(nm->b, i, nm->bf16) : 0.0f);
        }
    }
}

/* e^x on 8 lanes: x = n ln2 + r (|r| <= ln2 / 2), e^r by its Taylor polynomial to r^6 (relative
 * error ~1e-7), times 2^n through the exponent bits; x clamped to [-87, 88] first. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    const float c[6] = {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    for (int i = 0; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c[i]));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* The sigmoid-form activations, v sigmoid(z(v)): tanh GELU (z = 2 sqrt(2/pi) (v + 0.044715 v^3),
 * which is 0.5 v (1 + tanh(...)) exactly), fast GELU (z = 1.702 v), SiLU (z = v). */
static inline __m256 act8(int kind, __m256 v) {
    __m256 z = v;
    if (kind == ACT_GELU_TANH)
        z = _mm256_mul_ps(_mm256_set1_ps(1.5957691216057308f),
                          _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), _mm256_mul_ps(v, v), v));
    else if (kind == ACT_FAST_GELU)
        z = _mm256_mul_ps(_mm256_set1_ps(1.702f), v);
    __m256 out = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), z))));
    return _mm256_blendv_ps(out, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q)); /* NaN stays NaN */
}

static inline float act1(int kind, float v) {
    switch (kind) {
        case ACT_GELU_TANH: return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
        case ACT_GELU: return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
        case ACT_FAST_GELU: return v / (1.0f + expf(-1.702f * v));
        default: return v / (1.0f + expf(-v));
    }
}

/* y[i] = act(a[i]) (times b[i] when b is not NULL: SwiGLU's up), i < n. */
static void activate(int kind, const float *a, const float *b, float *y, int64_t n) {
    int64_t i = 0;
    if (kind != ACT_GELU)
        for (; i + 8 <= n; i += 8) {
            __m256 v = act8(kind, _mm256_loadu_ps(a + i));
            _mm256_storeu_ps(y + i, b ? _mm256_mul_ps(v, _mm256_loadu_ps(b + i)) : v);
        }
    for (; i < n; i++) y[i] = act1(kind, a[i]) * (b ? b[i] : 1.0f);
}

/* Rotate heads [heads, D] of one row at position p (non-interleaved halves, as layers.apply_rope). */
static void rope(const model_t *md, float *x, int64_t heads, int64_t p) {
    const int64_t d = md->head_dim, half = d / 2;
    float c[d], s[d];
    for (int64_t i = 0; i < d; i++) {
        c[i] = ld(md->rope_cos, p * d + i, md->rope_bf16);
        s[i] = ld(md->rope_sin, p * d + i, md->rope_bf16);
    }
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * d;
        for (int64_t i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            v[i] = a * c[i] - b * s[i];
            v[i + half] = b * c[i + half] + a * s[i + half];
        }
    }
}

/* Sum of a[e] * b[e] over e < d, b fp32 or bf16 (8 lanes, then the tail). */
static inline float dot(const float *a, const void *b, int64_t d, int b_bf16) {
    __m256 acc = _mm256_setzero_ps();
    int64_t e = 0;
    for (; e + 8 <= d; e += 8) {
        __m256 bv = b_bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                                 _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)b + e))), 16))
                           : _mm256_loadu_ps((const float *)b + e);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + e), bv, acc);
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    float sum = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    for (; e < d; e++) sum += a[e] * ld(b, e, b_bf16);
    return sum;
}

/* o[e] += p * b[e] over e < d, b fp32 or bf16. */
static inline void axpy(float *o, float p, const void *b, int64_t d, int b_bf16) {
    const __m256 pv = _mm256_set1_ps(p);
    int64_t e = 0;
    for (; e + 8 <= d; e += 8) {
        __m256 bv = b_bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                                 _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)b + e))), 16))
                           : _mm256_loadu_ps((const float *)b + e);
        _mm256_storeu_ps(o + e, _mm256_fmadd_ps(pv, bv, _mm256_loadu_ps(o + e)));
    }
    for (; e < d; e++) o[e] += p * ld(b, e, b_bf16);
}

/* Attention of each row's heads over its batch row's cache slots 0 .. pos[r] (softmax of
 * q.k / sqrt(D) in fp32): out [R, heads * D]. Query head h reads KV head h / (heads / kv_heads).
 * Team code; w: this thread's scratch of at least pos[r] + 1 floats. */
static void attend(const model_t *md, const block_t *bl, const float *q, const void *kc, const void *vc,
                   int64_t s_max, const int64_t *pos, int64_t t_per_row, int64_t r_total, float *out, float *w) {
    const int64_t d = md->head_dim, hq = bl->heads, hkv = bl->kv_heads, group = hq / hkv;
    const int cb = md->cache_bf16, size = cb ? 2 : 4;
    const float scale = 1.0f / sqrtf((float)d);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < r_total * hq; i++) {
        const int64_t r = i / hq, h = i % hq, n = pos[r] + 1;
        const char *kb = (const char *)kc + (((r / t_per_row) * hkv + h / group) * s_max) * d * size;
        const char *vb = (const char *)vc + (((r / t_per_row) * hkv + h / group) * s_max) * d * size;
        const float *qv = q + (r * hq + h) * d;
        float *o = out + (r * hq + h) * d, big = -INFINITY, sum = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            w[j] = dot(qv, kb + j * d * size, d, cb) * scale;
            big = w[j] > big ? w[j] : big;
        }
        for (int64_t j = 0; j < n; j++) sum += (w[j] = expf(w[j] - big));
        for (int64_t e = 0; e < d; e++) o[e] = 0.0f;
        for (int64_t j = 0; j < n; j++) axpy(o, w[j] / sum, vb + j * d * size, d, cb);
    }
}

/* Keys or values [R, H_kv * D] into the cache [B, H_kv, S, D] at each row's position. */
static void store(const model_t *md, const float *src, void *cache, int64_t hkv, int64_t s_max, const int64_t *pos,
                  int64_t t_per_row, int64_t r_total) {
    const int64_t d = md->head_dim;
    for (int64_t r = 0; r < r_total; r++)
        for (int64_t h = 0; h < hkv; h++) {
            const int64_t at = (((r / t_per_row) * hkv + h) * s_max + pos[r]) * d;
            const float *s = src + (r * hkv + h) * d;
            if (md->cache_bf16)
                for (int64_t e = 0; e < d; e++) ((uint16_t *)cache)[at + e] = to_bf(s[e]);
            else
                memcpy((float *)cache + at, s, sizeof(float) * d);
        }
}

/* Columns [c0, c0 + w) of y [M, n] into out [M, w]. */
static void columns(const float *y, int64_t n, int64_t c0, int64_t w, float *out, int64_t m) {
    for (int64_t r = 0; r < m; r++) memcpy(out + r * w, y + r * n + c0, sizeof(float) * w);
}

/* The step's scratch, sized for its widest block: rows x (hidden, q, kv, ffn, fused) floats. */
typedef struct {
    float *hn, *q, *k, *v, *att, *o, *up, *gate, *wide;
} scratch_t;

/* x [M, H] += the block's attention, then its MLP (team code). query_in [M, H]: PanGu-α's query
 * layer's source of queries (else NULL: the normed x). w: this thread's attention scratch.
 * Products do not wait for each other (`for nowait`): a barrier precedes every read of their
 * output. Returns nonzero when one of this thread's products failed (the step then discards
 * its result; every thread still passes every barrier). */
static int block(const model_t *md, const block_t *bl, float *x, const float *query_in, void *kc, void *vc,
                 int64_t s_max, const int64_t *pos, int64_t t_per_row, int64_t m, const scratch_t *sc, float *w) {
    const int64_t h = md->hidden, d = md->head_dim, qw = bl->heads * d, kw = bl->kv_heads * d;
    const int64_t ffn = md->swiglu && bl->gate_up.kind ? bl->gate_up.n / 2 : bl->up.n;
    int failed = 0;
#pragma omp single
    norm(md, &bl->attn_norm, x, sc->hn, m);
    if (bl->qkv.kind) {
        failed |= linear(md, &bl->qkv, sc->hn, sc->wide, m);
#pragma omp barrier
#pragma omp single
        {
            columns(sc->wide, qw + 2 * kw, 0, qw, sc->q, m);
            columns(sc->wide, qw + 2 * kw, qw, kw, sc->k, m);
            columns(sc->wide, qw + 2 * kw, qw + kw, kw, sc->v, m);
        }
    } else {
        failed |= linear(md, &bl->q, query_in ? query_in : sc->hn, sc->q, m);
        failed |= linear(md, &bl->k, sc->hn, sc->k, m);
        failed |= linear(md, &bl->v, sc->hn, sc->v, m);
#pragma omp barrier
    }
#pragma omp single
    {
        if (md->rope_cos != NULL)
            for (int64_t r = 0; r < m; r++) {
                rope(md, sc->q + r * qw, bl->heads, pos[r]);
                rope(md, sc->k + r * kw, bl->kv_heads, pos[r]);
            }
        store(md, sc->k, kc, bl->kv_heads, s_max, pos, t_per_row, m);
        store(md, sc->v, vc, bl->kv_heads, s_max, pos, t_per_row, m);
    }
    attend(md, bl, sc->q, kc, vc, s_max, pos, t_per_row, m, sc->att, w);
    failed |= linear(md, &bl->o, sc->att, sc->o, m);
#pragma omp barrier
#pragma omp single
    {
        for (int64_t i = 0; i < m * h; i++) x[i] += sc->o[i];
        norm(md, &bl->mlp_norm, x, sc->hn, m);
    }
    if (md->swiglu && bl->gate_up.kind) {
        failed |= linear(md, &bl->gate_up, sc->hn, sc->wide, m);
#pragma omp barrier
#pragma omp single
        {
            columns(sc->wide, 2 * ffn, 0, ffn, sc->gate, m);
            columns(sc->wide, 2 * ffn, ffn, ffn, sc->up, m);
        }
    } else {
        if (md->swiglu) failed |= linear(md, &bl->gate, sc->hn, sc->gate, m);
        failed |= linear(md, &bl->up, sc->hn, sc->up, m);
#pragma omp barrier
    }
#pragma omp single
    activate(md->act, md->swiglu ? sc->gate : sc->up, md->swiglu ? sc->up : NULL, sc->up, m * ffn);
    failed |= linear(md, &bl->down, sc->up, sc->o, m);
#pragma omp barrier
#pragma omp single
    for (int64_t i = 0; i < m * h; i++) x[i] += sc->o[i];
    return failed;
}

/* Every block, the final norm and the query layer (team code; w: this thread's attention
 * scratch). Returns nonzero when one of this thread's products failed. */
static int blocks(const model_t *md, float *x, const float *query, const int64_t *pos, int64_t t_per_row, int64_t rows,
                  void *const *keys, void *const *values, int64_t s_max, const scratch_t *sc, float *w) {
    const int64_t n = md->layers - (md->query_layer ? 1 : 0);
    int failed = 0;
    for (int64_t i = 0; i < n; i++)
        failed |= block(md, &md->blocks[i], x, NULL, keys[i], values[i], s_max, pos, t_per_row, rows, sc, w);
#pragma omp single
    {
        norm(md, &md->final_norm, x, sc->hn, rows);
        memcpy(x, sc->hn, sizeof(float) * rows * md->hidden);
    }
    if (md->query_layer)
        failed |= block(md, &md->blocks[n], x, query, keys[n], values[n], s_max, pos, t_per_row, rows, sc, w);
    return failed;
}

/* x [R, H] (fp32): the embedded tokens in, the final hidden states out. pos [R]: each row's
 * position; rows b * T .. b * T + T - 1 are batch row b. keys[i], values[i]: layer i's cache
 * [B, kv_heads_i, s_max, D] in the cache dtype. Runs on `threads` threads. Returns 0, or -1 when
 * memory ran out (x is then not to be used). */
int pangu_step(const model_t *md, float *x, const int64_t *pos, int64_t t_per_row, int64_t rows, void *const *keys,
               void *const *values, int64_t s_max, int threads) {
    const int64_t h = md->hidden, d = md->head_dim;
    int64_t qw = 0, kw = 0, ffn = 0, longest = 1;
    for (int64_t i = 0; i < md->layers; i++) {
        const block_t *bl = &md->blocks[i];
        qw = bl->heads * d > qw ? bl->heads * d : qw;
        kw = bl->kv_heads * d > kw ? bl->kv_heads * d : kw;
        const int64_t f = md->swiglu && bl->gate_up.kind ? bl->gate_up.n / 2 : bl->up.n;
        ffn = f > ffn ? f : ffn;
    }
    for (int64_t r = 0; r < rows; r++) longest = pos[r] + 1 > longest ? pos[r] + 1 : longest;
    const int64_t wide = qw + 2 * kw > 2 * ffn ? qw + 2 * kw : 2 * ffn;
    float *all = malloc(sizeof(float) * rows * (3 * h + 2 * qw + 2 * kw + 2 * ffn + wide));
    float *query = md->query_layer ? malloc(sizeof(float) * rows * h) : NULL;
    float *w = malloc(sizeof(float) * threads * longest); /* each thread's attention scores */
    if (all == NULL || w == NULL || (md->query_layer && query == NULL)) {
        free(all);
        free(query);
        free(w);
        return -1;
    }
    scratch_t sc = {.hn = all, .q = all + rows * h};
    sc.k = sc.q + rows * qw;
    sc.v = sc.k + rows * kw;
    sc.att = sc.v + rows * kw;
    sc.o = sc.att + rows * qw;
    sc.up = sc.o + rows * h;
    sc.gate = sc.up + rows * ffn;
    sc.wide = sc.gate + rows * ffn;
    for (int64_t r = 0; query != NULL && r < rows; r++)
        for (int64_t i = 0; i < h; i++) query[r * h + i] = ld(md->query_embed, pos[r] * h + i, md->query_bf16);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    failed |= blocks(md, x, query, pos, t_per_row, rows, keys, values, s_max, &sc, w + omp_get_thread_num() * longest);
    free(all);
    free(query);
    free(w);
    return failed ? -1 : 0;
}
