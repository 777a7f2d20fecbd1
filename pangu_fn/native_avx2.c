/* Weight-streaming matrix products for few activation rows, x86-64 with AVX2 and FMA (no AVX-512).
 *
 * The AVX2 counterpart of native_kernels.c, built by native.py instead of it where the compiler
 * targets AVX2 but not AVX-512F. Activations are fp32 or bf16; products are summed in fp32
 * (FMA on 8 lanes) and written once in the activations' dtype. Each output row's weights are read
 * once per call: the row loop is outermost (shared among OpenMP threads, torch's libgomp), and
 * all activation rows, ROWS at a time, pass over a weight row while it is in L1.
 *
 *   int8: y = scales[n] sum_k x[m, k] w[n, k] + bias[n]          w int8 [N, K], scales [N]
 *   int4: y = sum_g scales[n, g] sum_{k in g} x[m, k] (c[n, k] - zero[n, g]) + bias[n]
 *         c: ONNX MatMulNBits bytes [N, K/2] (element 2i in the low nibble of byte i),
 *         scales [N, K/G], zeros uint8 [N, K/G] or NULL (zero 8)
 *   bf16: y = sum_k x[m, k] w[n, k] + bias[n]                     w bf16 [N, K]
 *
 * `flags` give the dtypes: X_BF16 for x and y (else fp32), S_BF16 for the scales, B_BF16 for
 * the bias (NULL: none). Each entry returns 0, or -1 for a shape it does not take or when
 * memory runs out (y is then not to be used). Codes and bf16 weights become fp32 exactly.
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
#define X_Q16 8 /* int8 / int4: activations rounded to int16 per block of 32 (the fused step, native_step.c) */
#define ROWS 4 /* activation rows per pass over a weight row (registers: ROWS x 2 accumulators) */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest, ties to even */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float load_f(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_f(void *p, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* Each product is "team code", `pangu_avx2_*_team`: every thread of the calling OpenMP team
 * calls it with the same arguments, prepares its own copy of the activations (a few thousand
 * values: cheaper than a barrier), computes its share of the output rows (`for nowait`) and
 * returns; every thread returns the same code. The caller places the barrier before anything
 * reads the output (so independent products, q / k / v, run back to back). Called outside a
 * parallel region a product runs on the calling thread alone. The fused step (native_step.c)
 * calls them inside its one parallel region; `pangu_avx2_*_linear` runs one on `threads`
 * threads (the region's end is the barrier). */
#define ON_THREADS(threads, TEAM_CALL)                                                               \
    do {                                                                                             \
        int failed_ = 0;                                                                             \
        _Pragma("omp parallel num_threads(threads) reduction(| : failed_)") failed_ |= TEAM_CALL != 0; \
        return failed_ ? -1 : 0;                                                                     \
    } while (0)

/* Frees what a team's `single` allocated, once every thread is past the loop that read it. */
static void team_free(void *a, void *b, void *c) {
#pragma omp barrier
#pragma omp single
    {
        free(a);
        free(b);
        free(c);
    }
}

/* A thread's own allocations: all or none (each thread decides alone, so a failure can differ
 * between threads: a failed thread's rows are then not written and the call returns -1 there). */
static void free3(void *a, void *b, void *c) {
    free(a);
    free(b);
    free(c);
}

/* x [M, K] as fp32, each block of `block` (16 or 32) elements in the order `perm(j)` lists,
 * so that the weights need no shuffle across lanes after unpacking. */
static float *activations(const void *x, int64_t m_total, int64_t k_total, int bf16, int block,
                          int (*perm)(int)) {
    float *xf = alloc64(sizeof(float) * m_total * k_total);
    if (xf == NULL) return NULL;
    for (int64_t i = 0; i < m_total * k_total; i += block)
        for (int j = 0; j < block; j++) xf[i + j] = load_f(x, i + perm(j), bf16);
    return xf;
}

static int same_order(int j) { return j; }

/* bf16 activations as int16, per block of 32 elements (a scale max|x| / 32767 each), for
 * integer products (`_mm256_madd_epi16`: 16 pairs multiplied, adjacent products added, exact in
 * int32) converted to fp32 once per block. A bf16 activation carries 8 significant bits;
 * rounding it to its block's int16 grid moves it by at most max|x| / 65534 of the block, well
 * inside the bf16 rounding of the output (which the tests check each output against; for int8,
 * 1.0-1.3x faster, it summed to more than the fp32 summation error they allow, so int8 keeps
 * fp32). A block
 * holding an infinity or NaN gets a NaN scale, so it reaches the output as in fp32. */
static int q16_activations(const void *x, int x_bf16, int64_t m_total, int64_t k_total, int (*perm)(int),
                           int16_t **q, float **scales) {
    *q = alloc64(sizeof(int16_t) * m_total * k_total);
    *scales = alloc64(sizeof(float) * m_total * k_total / 32);
    if (*q == NULL || *scales == NULL) {
        free(*q);
        free(*scales);
        *q = NULL;
        *scales = NULL;
        return -1;
    }
    for (int64_t b = 0; b < m_total * k_total / 32; b++) {
        float v[32], big = 0.0f;
        for (int j = 0; j < 32; j++) {
            v[j] = load_f(x, 32 * b + perm(j), x_bf16);
            big = fabsf(v[j]) > big || v[j] != v[j] ? fabsf(v[j]) : big;
        }
        int finite = big <= 3.4e38f;
        float inv = finite && big > 0.0f ? 32767.0f / big : 0.0f;
        (*scales)[b] = finite ? big / 32767.0f : NAN;
        for (int j = 0; j < 32; j++) (*q)[32 * b + j] = (int16_t)_mm_cvt_ss2si(_mm_set_ss(v[j] * inv));
    }
    return 0;
}

/* A constant row count R after inlining keeps the accumulators in registers. */
#define BY_ROWS(F, ...)                                                                              \
    switch (rows) {                                                                                  \
        case 1: F(1, __VA_ARGS__); break;                                                            \
        case 2: F(2, __VA_ARGS__); break;                                                            \
        case 3: F(3, __VA_ARGS__); break;                                                            \
        default: F(4, __VA_ARGS__); break;                                                           \
    }

/* Writes sums[m] + bias[n] for R rows (sums already scaled). */
static inline void write_rows(int R, const float *sums, const void *bias, void *y, int64_t n, int64_t n_total,
                              int flags) {
    float b = bias == NULL ? 0.0f : load_f(bias, n, flags & B_BF16);
    for (int m = 0; m < R; m++) store_f(y, m * n_total + n, sums[m] + b, flags & X_BF16);
}

/* sums[m] = every lane of acc[m][0 .. U-1], m < R (the kernels' independent accumulators). */
static inline __attribute__((always_inline)) void add_up(const int R, const int U, __m256 acc[ROWS][4], float *sums) {
    for (int m = 0; m < R; m++) {
        for (int u = 1; u < U; u++) acc[m][0] = _mm256_add_ps(acc[m][0], acc[m][u]);
        sums[m] = hsum(acc[m][0]);
    }
}

/* ---- int8: 8 weights at a time sign-extended to int32, converted to fp32 (exact) ---- */

static inline __attribute__((always_inline)) void int8_rows(const int R, const float *xf, const int8_t *wn,
                                                            int64_t k_total, float *sums) {
    const int U = R == 1 ? 4 : 2; /* independent accumulators per row */
    __m256 acc[ROWS][4];
    for (int m = 0; m < R; m++)
        for (int u = 0; u < U; u++) acc[m][u] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_total; k += 32)
        for (int v = 0; v < 4; v++) {
            __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wn + k + 8 * v))));
            for (int m = 0; m < R; m++)
                acc[m][v % U] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xf + m * k_total + k + 8 * v), acc[m][v % U]);
        }
    add_up(R, U, acc, sums);
}

/* With X_Q16: 32 weights sign-extended to int16 against the int16 activations (`_mm256_madd_epi16`,
 * exact in int32), converted once per block of 32 and scaled by the block's activation scale. */
static inline __attribute__((always_inline)) void int8_rows_q16(const int R, const int16_t *xq, const float *xs,
                                                                const int8_t *wn, int64_t k_total, float *sums) {
    __m256 acc[ROWS];
    for (int m = 0; m < R; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_total; k += 32) {
        __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wn + k)));
        __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wn + k + 16)));
        for (int m = 0; m < R; m++) {
            const int16_t *xm = xq + m * k_total + k;
            __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xm)),
                                         _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xm + 16))));
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(xs + (m * k_total + k) / 32), acc[m]);
        }
    }
    for (int m = 0; m < R; m++) sums[m] = hsum(acc[m]);
}

/* K a multiple of 32. */
int pangu_avx2_int8_team(const void *x, const int8_t *w, const void *scales, const void *bias, void *y,
                         int64_t m_total, int64_t n_total, int64_t k_total, int flags) {
    if (k_total % 32 != 0) return -1;
    const int q16 = flags & X_Q16;
    float *xf = NULL, *xs = NULL;
    int16_t *xq = NULL;
    if (q16)
        q16_activations(x, flags & X_BF16, m_total, k_total, same_order, &xq, &xs);
    else
        xf = activations(x, m_total, k_total, flags & X_BF16, 32, same_order);
    const int failed = q16 ? xq == NULL : xf == NULL;
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < n_total; n++) {
        const float s = load_f(scales, n, flags & S_BF16);
        for (int64_t m0 = 0; m0 < m_total && !failed; m0 += ROWS) {
            int rows = m_total - m0 < ROWS ? (int)(m_total - m0) : ROWS;
            float sums[ROWS];
            if (q16) {
                BY_ROWS(int8_rows_q16, xq + m0 * k_total, xs + m0 * k_total / 32, w + n * k_total, k_total, sums)
            } else {
                BY_ROWS(int8_rows, xf + m0 * k_total, w + n * k_total, k_total, sums)
            }
            for (int m = 0; m < rows; m++) sums[m] *= s;
            char *ym = (char *)y + m0 * n_total * (flags & X_BF16 ? 2 : 4);
            write_rows(rows, sums, bias, ym, n, n_total, flags);
        }
    }
    free3(xf, xq, xs);
    return failed ? -1 : 0;
}

int pangu_avx2_int8_linear(const void *x, const int8_t *w, const void *scales, const void *bias, void *y,
                           int64_t m_total, int64_t n_total, int64_t k_total, int flags, int threads) {
    ON_THREADS(threads, pangu_avx2_int8_team(x, w, scales, bias, y, m_total, n_total, k_total, flags));
}

/* ---- int4: 8 bytes (16 codes) at a time; codes minus the zero point as int8 (exact) ----
 * The low nibbles hold the even elements of the 16, the high nibbles the odd ones, so the
 * activations are stored evens first in each block of 16 and no interleaving is needed. */

static int evens_first_16(int j) { return j < 8 ? 2 * j : 2 * (j - 8) + 1; }

static inline __attribute__((always_inline)) void int4_rows(const int R, const float *xf, const uint8_t *qn,
                                                            const void *sn, const uint8_t *zn, int64_t k_total,
                                                            int64_t group, int flags, float *sums) {
    const int U = R == 1 ? 4 : R == 2 ? 2 : 1; /* independent sums per row: FMA latency */
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m256 acc[ROWS];
    for (int m = 0; m < R; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < k_total / group; g++) {
        const __m128i z = _mm_set1_epi8((char)(zn == NULL ? 8 : zn[g]));
        __m256 d[ROWS][4];
        for (int m = 0; m < R; m++)
            for (int u = 0; u < U; u++) d[m][u] = _mm256_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k += 32)
            for (int h = 0; h < 2; h++) { /* 8 bytes: 16 codes, evens in the low nibbles */
                __m128i v = _mm_loadl_epi64((const __m128i *)(qn + k / 2 + 8 * h));
                __m256 even = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_sub_epi8(_mm_and_si128(v, low4), z)));
                __m256 odd = _mm256_cvtepi32_ps(
                    _mm256_cvtepi8_epi32(_mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), low4), z)));
                for (int m = 0; m < R; m++) {
                    const float *xm = xf + m * k_total + k + 16 * h;
                    d[m][(2 * h) % U] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xm), d[m][(2 * h) % U]);
                    d[m][(2 * h + 1) % U] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xm + 8), d[m][(2 * h + 1) % U]);
                }
            }
        const __m256 s = _mm256_set1_ps(load_f(sn, g, flags & S_BF16));
        for (int m = 0; m < R; m++) {
            for (int u = 1; u < U; u++) d[m][0] = _mm256_add_ps(d[m][0], d[m][u]);
            acc[m] = _mm256_fmadd_ps(d[m][0], s, acc[m]);
        }
    }
    for (int m = 0; m < R; m++) sums[m] = hsum(acc[m]);
}

static int evens_first_32(int j) { return j < 16 ? 2 * j : 2 * (j - 16) + 1; }

/* One row: 16 bytes (32 codes) a step, zero-extended to int16 (byte i in lane i: its low nibble is
 * element 2i, its high nibble, the lane shifted right by 4, element 2i + 1), against the
 * activations stored evens first. The zero point comes off once per group:
 * sum_k (c_k - z) x_k = sum_k c_k x_k - z zx[g], zx[g] = sum_{k in g} x_k (as rounded). */
static float int4_row_q16(const int16_t *xq, const float *xs, const float *zx, const uint8_t *qn, const void *sn,
                          const uint8_t *zn, int64_t k_total, int64_t group, int flags) {
    const __m256i low4 = _mm256_set1_epi16(0x0F);
    __m256 acc = _mm256_setzero_ps();
    float corr = 0.0f;
    for (int64_t g = 0; g < k_total / group; g++) {
        __m256 d = _mm256_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
            __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qn + k / 2)));
            __m256i p = _mm256_add_epi32(
                _mm256_madd_epi16(_mm256_and_si256(w, low4), _mm256_loadu_si256((const __m256i *)(xq + k))),
                _mm256_madd_epi16(_mm256_srli_epi16(w, 4), _mm256_loadu_si256((const __m256i *)(xq + k + 16))));
            d = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(xs + k / 32), d);
        }
        const float s = load_f(sn, g, flags & S_BF16);
        acc = _mm256_fmadd_ps(d, _mm256_set1_ps(s), acc);
        corr += s * (float)(zn == NULL ? 8 : zn[g]) * zx[g];
    }
    return hsum(acc) - corr;
}

/* zx[g] = sum over group g of the rounded activations (xq times its block's scale). */
static float *group_sums(const int16_t *xq, const float *xs, int64_t k_total, int64_t group) {
    float *zx = alloc64(sizeof(float) * (k_total / group));
    if (zx == NULL) return NULL;
    for (int64_t g = 0; g < k_total / group; g++) {
        zx[g] = 0.0f;
        for (int64_t b = g * group / 32; b < (g + 1) * group / 32; b++) {
            int32_t sum = 0;
            for (int j = 0; j < 32; j++) sum += xq[32 * b + j];
            zx[g] += xs[b] * (float)sum;
        }
    }
    return zx;
}

/* G a multiple of 32 dividing K. One row of bf16 activations takes the int16 route (one
 * thread, GPT-2-small's shapes: 12-14 vs 9.5-11 G weights/s); from two rows on it was no
 * faster than fp32 (at four rows slower: 3-6 vs 6 G weights/s), so they take the fp32 one. */
int pangu_avx2_int4_team(const void *x, const uint8_t *q, const void *scales, const uint8_t *zeros,
                         const void *bias, void *y, int64_t m_total, int64_t n_total, int64_t k_total,
                         int64_t group, int flags) {
    if (group <= 0 || group % 32 != 0 || k_total % group != 0) return -1;
    const int64_t blocks = k_total / group;
    const int64_t scale_size = flags & S_BF16 ? 2 : 4;
    if ((flags & (X_BF16 | X_Q16)) && m_total == 1) {
        int16_t *xq = NULL;
        float *xs = NULL, *zx = NULL;
        if (q16_activations(x, flags & X_BF16, m_total, k_total, evens_first_32, &xq, &xs) == 0)
            zx = group_sums(xq, xs, k_total, group);
#pragma omp for schedule(static) nowait
        for (int64_t n = 0; n < n_total; n++)
            if (zx != NULL) {
                float sum = int4_row_q16(xq, xs, zx, q + n * (k_total / 2), (const char *)scales + n * blocks * scale_size,
                                         zeros == NULL ? NULL : zeros + n * blocks, k_total, group, flags);
                write_rows(1, &sum, bias, y, n, n_total, flags);
            }
        free3(xq, xs, zx);
        return zx == NULL ? -1 : 0;
    }
    float *xf = activations(x, m_total, k_total, flags & X_BF16, 16, evens_first_16);
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < n_total; n++) {
        if (xf == NULL) continue;
        const uint8_t *zn = zeros == NULL ? NULL : zeros + n * blocks;
        const char *sn = (const char *)scales + n * blocks * scale_size;
        for (int64_t m0 = 0; m0 < m_total; m0 += ROWS) {
            int rows = m_total - m0 < ROWS ? (int)(m_total - m0) : ROWS;
            float sums[ROWS];
            BY_ROWS(int4_rows, xf + m0 * k_total, q + n * (k_total / 2), sn, zn, k_total, group, flags, sums)
            char *ym = (char *)y + m0 * n_total * (flags & X_BF16 ? 2 : 4);
            write_rows(rows, sums, bias, ym, n, n_total, flags);
        }
    }
    free(xf);
    return xf == NULL ? -1 : 0;
}

int pangu_avx2_int4_linear(const void *x, const uint8_t *q, const void *scales, const uint8_t *zeros,
                           const void *bias, void *y, int64_t m_total, int64_t n_total, int64_t k_total,
                           int64_t group, int flags, int threads) {
    ON_THREADS(threads, pangu_avx2_int4_team(x, q, scales, zeros, bias, y, m_total, n_total, k_total, group, flags));
}

/* ---- bf16: 16 weights per load; a 16-bit shift (even elements) and a mask (odd ones) make
 * them fp32 exactly, so the activations are stored evens first in each block of 16 ---- */

static inline __attribute__((always_inline)) void bf16_rows(const int R, const float *xf, const uint16_t *wn,
                                                            int64_t k_total, float *sums) {
    const int U = R == 1 ? 4 : 2;
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc[ROWS][4];
    for (int m = 0; m < R; m++)
        for (int u = 0; u < U; u++) acc[m][u] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_total; k += 32)
        for (int h = 0; h < 2; h++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(wn + k + 16 * h));
            __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
            for (int m = 0; m < R; m++) {
                const float *xm = xf + m * k_total + k + 16 * h;
                acc[m][(2 * h) % U] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xm), acc[m][(2 * h) % U]);
                acc[m][(2 * h + 1) % U] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xm + 8), acc[m][(2 * h + 1) % U]);
            }
        }
    add_up(R, U, acc, sums);
}

/* K a multiple of 32. */
int pangu_avx2_bf16_team(const void *x, const uint16_t *w, const void *bias, void *y, int64_t m_total,
                         int64_t n_total, int64_t k_total, int flags) {
    if (k_total % 32 != 0) return -1;
    float *xf = activations(x, m_total, k_total, flags & X_BF16, 16, evens_first_16);
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < n_total; n++) {
        if (xf == NULL) continue;
        for (int64_t m0 = 0; m0 < m_total; m0 += ROWS) {
            int rows = m_total - m0 < ROWS ? (int)(m_total - m0) : ROWS;
            float sums[ROWS];
            BY_ROWS(bf16_rows, xf + m0 * k_total, w + n * k_total, k_total, sums)
            char *ym = (char *)y + m0 * n_total * (flags & X_BF16 ? 2 : 4);
            write_rows(rows, sums, bias, ym, n, n_total, flags);
        }
    }
    free(xf);
    return xf == NULL ? -1 : 0;
}

int pangu_avx2_bf16_linear(const void *x, const uint16_t *w, const void *bias, void *y, int64_t m_total,
                           int64_t n_total, int64_t k_total, int flags, int threads) {
    ON_THREADS(threads, pangu_avx2_bf16_team(x, w, bias, y, m_total, n_total, k_total, flags));
}

/* ---- fp32 weights (the fused decode step, native_step.c; fp32 activations and output) ---- */

static inline __attribute__((always_inline)) void f32_rows(const int R, const float *x, const float *wn,
                                                           int64_t k_total, float *sums) {
    const int U = R == 1 ? 4 : 2;
    __m256 acc[ROWS][4];
    for (int m = 0; m < R; m++)
        for (int u = 0; u < U; u++) acc[m][u] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_total; k += 32)
        for (int v = 0; v < 4; v++) {
            __m256 w = _mm256_loadu_ps(wn + k + 8 * v);
            for (int m = 0; m < R; m++)
                acc[m][v % U] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * k_total + k + 8 * v), acc[m][v % U]);
        }
    add_up(R, U, acc, sums);
}

/* y [M, N] = x [M, K] w [N, K].T + bias; K a multiple of 32. */
int pangu_avx2_f32_team(const float *x, const float *w, const void *bias, float *y, int64_t m_total,
                        int64_t n_total, int64_t k_total, int flags) {
    if (k_total % 32 != 0) return -1;
    flags &= ~X_BF16;
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < n_total; n++)
        for (int64_t m0 = 0; m0 < m_total; m0 += ROWS) {
            int rows = m_total - m0 < ROWS ? (int)(m_total - m0) : ROWS;
            float sums[ROWS];
            BY_ROWS(f32_rows, x + m0 * k_total, w + n * k_total, k_total, sums)
            write_rows(rows, sums, bias, y + m0 * n_total, n, n_total, flags);
        }
    return 0;
}

/* y [M, N] = x [M, K] wt [K, N] + bias, for a weight stored column-major (wt = W.T row-major,
 * params.decode_layout): each thread streams a contiguous K-slice of wt into partial sums of all
 * outputs (kept in L1 / L2: N at a time for one row, 512 columns at a time for more), four
 * weight rows per pass over them; then the threads add their partials. N a multiple of 8, K of 4. */
int pangu_avx2_f32t_team(const float *x, const float *wt, const void *bias, float *y, int64_t m_total,
                         int64_t n_total, int64_t k_total, int flags) {
    if (n_total % 8 != 0 || k_total % 4 != 0) return -1;
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    float *part = NULL;
#pragma omp single copyprivate(part)
    part = alloc64(sizeof(float) * nt * m_total * n_total);
    if (part == NULL) return -1;
    const int64_t chunk = m_total == 1 ? n_total : 512;
    const int64_t k0 = k_total / 4 * t / nt * 4, k1 = k_total / 4 * (t + 1) / nt * 4;
    float *p = part + t * m_total * n_total;
    memset(p, 0, sizeof(float) * m_total * n_total);
    for (int64_t c0 = 0; c0 < n_total; c0 += chunk) {
        const int64_t c1 = c0 + chunk < n_total ? c0 + chunk : n_total;
        for (int64_t k = k0; k < k1; k += 4) {
            const float *w0 = wt + k * n_total, *w1 = w0 + n_total, *w2 = w1 + n_total, *w3 = w2 + n_total;
            for (int64_t m = 0; m < m_total; m++) {
                const float *xm = x + m * k_total + k;
                const __m256 a0 = _mm256_set1_ps(xm[0]), a1 = _mm256_set1_ps(xm[1]), a2 = _mm256_set1_ps(xm[2]),
                             a3 = _mm256_set1_ps(xm[3]);
                float *pm = p + m * n_total;
                for (int64_t j = c0; j < c1; j += 8) {
                    __m256 s = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + j), a0, _mm256_load_ps(pm + j));
                    s = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + j), a1, s);
                    s = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + j), a2, s);
                    _mm256_store_ps(pm + j, _mm256_fmadd_ps(_mm256_loadu_ps(w3 + j), a3, s));
                }
            }
        }
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m_total * n_total; i++) {
        float s = 0.0f;
        for (int u = 0; u < nt; u++) s += part[u * m_total * n_total + i];
        y[i] = s + (bias == NULL ? 0.0f : load_f(bias, i % n_total, flags & B_BF16));
    }
    team_free(part, NULL, NULL);
    return 0;
}

int pangu_avx2_f32_linear(const float *x, const float *w, const void *bias, float *y, int64_t m_total,
                          int64_t n_total, int64_t k_total, int flags, int threads) {
    ON_THREADS(threads, pangu_avx2_f32_team(x, w, bias, y, m_total, n_total, k_total, flags));
}
