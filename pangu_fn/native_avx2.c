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
 *   int4t: the int4 product on AVX2 tiles (quant/packing.py, [ceil(N/8), K/8, 8, 4]), the
 *         activations rounded to int8 per block of 32 (`pangu_avx2_int4t_*`, below)
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
#define AHEAD 1024 /* bytes of int4 codes prefetched ahead: 1.1-1.4x the int16 route's speed from memory on
                     two threads (its hardware prefetchers alone: ~12-17 GB/s of codes) */
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

/* x [M, K] as fp32, each block of `block` (16 or 32) elements in the order `perm(j)` lists (NULL: as they are),
 * so that the weights need no shuffle across lanes after unpacking. */
static float *activations(const void *x, int64_t m_total, int64_t k_total, int bf16, int block,
                          int (*perm)(int)) {
    float *xf = alloc64(sizeof(float) * m_total * k_total);
    if (xf == NULL) return NULL;
    for (int64_t i = 0; i < m_total * k_total; i += block)
        for (int j = 0; j < block; j++) xf[i + j] = load_f(x, i + (perm == NULL ? j : perm(j)), bf16);
    return xf;
}

/* Activations rounded to int16 for the integer products (`_mm256_madd_epi16`: 16 pairs multiplied,
 * adjacent products added, exact in int32): x [M, K] per block of `block` elements (a multiple of
 * 32 dividing K) gets a scale max|x| / 32767 (`xs` [M K / block]) and, when `sums` is given, the
 * sum of its int16 values (`sums` [M K / block], exact for blocks up to 65536); with `evens_first` each 32 is
 * stored evens first (the int4 products' order). A bf16 activation carries 8 significant bits;
 * rounding it to its block's int16 grid moves it by at most max|x| / 65534 of the block. A block
 * holding an infinity or NaN gets a NaN scale, so it reaches the output as in fp32. */
static inline __m256 load8(const void *x, int64_t i, int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)x + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* 16 int32 (a, b) as int16 in their order. */
static inline __m256i pack16(__m256i a, __m256i b) {
    return _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
}

static int q16_blocks(const void *x, int x_bf16, int64_t m_total, int64_t k_total, int64_t block, int evens_first,
                      int16_t **xq, float **xs, int32_t **sums) {
    const int64_t blocks = m_total * k_total / block;
    *xq = alloc64(sizeof(int16_t) * m_total * k_total);
    *xs = alloc64(sizeof(float) * blocks);
    int32_t *total_of = sums == NULL ? NULL : alloc64(sizeof(int32_t) * blocks);
    if (*xq == NULL || *xs == NULL || (sums != NULL && total_of == NULL)) {
        free3(*xq, *xs, total_of);
        *xq = NULL;
        *xs = NULL;
        return -1;
    }
    if (sums != NULL) *sums = total_of;
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t base = b * block;
        __m256 big = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
        for (int64_t j = 0; j < block; j += 8) {
            __m256 v = load8(x, base + j, x_bf16);
            big = _mm256_max_ps(big, _mm256_and_ps(v, magnitude));
            odd = _mm256_or_ps(odd, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(big), _mm256_extractf128_ps(big, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        const float top = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m))); /* the block's max|x| */
        const int finite = _mm256_movemask_ps(odd) == 0 && top <= 3.4e38f;
        const __m256 inv = _mm256_set1_ps(finite && top > 0.0f ? 32767.0f / top : 0.0f);
        __m256i total = _mm256_setzero_si256();
        for (int64_t j = 0; j < block; j += 32) {
            __m256i c[4];
            for (int u = 0; u < 4; u++) c[u] = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, base + j + 8 * u, x_bf16), inv));
            __m256i lo = pack16(c[0], c[1]), hi = pack16(c[2], c[3]); /* elements 0-15, 16-31 */
            if (evens_first) {
                __m256i e = pack16(_mm256_srai_epi32(_mm256_slli_epi32(lo, 16), 16), _mm256_srai_epi32(_mm256_slli_epi32(hi, 16), 16));
                __m256i o = pack16(_mm256_srai_epi32(lo, 16), _mm256_srai_epi32(hi, 16));
                lo = e;
                hi = o;
            }
            _mm256_storeu_si256((__m256i *)(*xq + base + j), lo);
            _mm256_storeu_si256((__m256i *)(*xq + base + j + 16), hi);
            total = _mm256_add_epi32(total, _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, ones)));
        }
        (*xs)[b] = finite ? top / 32767.0f : NAN;
        int32_t lanes[8];
        _mm256_storeu_si256((__m256i *)lanes, total);
        int64_t sum = 0;
        for (int u = 0; u < 8; u++) sum += lanes[u];
        if (total_of != NULL) total_of[b] = (int32_t)sum;
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
        q16_blocks(x, flags & X_BF16, m_total, k_total, 32, 0, &xq, &xs, NULL);
    else
        xf = activations(x, m_total, k_total, flags & X_BF16, 32, NULL);
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

/* lane g = the sum of v[g]'s lanes (int32). */
static inline __m256i sum_each(const __m256i v[8]) {
    __m256i a0 = _mm256_hadd_epi32(v[0], v[1]), a1 = _mm256_hadd_epi32(v[2], v[3]);
    __m256i a2 = _mm256_hadd_epi32(v[4], v[5]), a3 = _mm256_hadd_epi32(v[6], v[7]);
    __m256i b0 = _mm256_hadd_epi32(a0, a1), b1 = _mm256_hadd_epi32(a2, a3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(b0, b1, 0x20), _mm256_permute2x128_si256(b0, b1, 0x31));
}

/* 8 values from i on (fewer than 8: the rest 0) of fp32 / bf16 / uint8 arrays. */
static inline __m256 load_part(const void *p, int64_t i, int c, int bf16) {
    if (c == 8) return load8(p, i, bf16);
    float v[8] = {0};
    for (int j = 0; j < c; j++) v[j] = load_f(p, i + j, bf16);
    return _mm256_loadu_ps(v);
}

static inline __m256i load_part_u8(const uint8_t *p, int64_t i, int c) {
    if (p == NULL) return _mm256_set1_epi32(8);
    if (c == 8) return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + i)));
    int32_t v[8] = {0};
    for (int j = 0; j < c; j++) v[j] = p[i + j];
    return _mm256_loadu_si256((const __m256i *)v);
}

static inline __m256i load_part_i32(const int32_t *p, int64_t i, int c) {
    if (c == 8) return _mm256_loadu_si256((const __m256i *)(p + i));
    int32_t v[8] = {0};
    for (int j = 0; j < c; j++) v[j] = p[i + j];
    return _mm256_loadu_si256((const __m256i *)v);
}

/* R rows, one output: 16 bytes (32 codes) a step, zero-extended to int16 (byte i in lane i: its
 * low nibble is element 2i, its high nibble, the lane shifted right by 4, element 2i + 1),
 * against the activations stored evens first and rounded to int16 per group (scale `xs`, sum of
 * the int16 values `xsum`). A group's products are summed exactly in int32 (`group_fits`), and
 * the zero point comes off in integers: sum_k (c_k - z) x_k = sum_k c_k x_k - z xsum. Then 8
 * groups at a time are summed across lanes, converted, and scaled by their weight and activation
 * scales with vector operations (one row's scalar work per group was a third of its time). */
static inline __attribute__((always_inline)) void int4_rows_q16(const int R, const int16_t *xq, const float *xs,
                                                                const int32_t *xsum, const uint8_t *qn, const void *sn,
                                                                const uint8_t *zn, int64_t k_total, int64_t group,
                                                                int flags, float *sums) {
    const __m256i low4 = _mm256_set1_epi16(0x0F);
    const int64_t groups = k_total / group;
    __m256 acc[ROWS];
    for (int m = 0; m < R; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < groups; g0 += 8) {
        const int c = groups - g0 < 8 ? (int)(groups - g0) : 8;
        __m256i dot[ROWS][8];
        for (int j = 0; j < 8; j++) {
            for (int m = 0; m < R; m++) dot[m][j] = _mm256_setzero_si256();
            if (j >= c) continue;
            const int64_t g = g0 + j;
            __m256i d[ROWS][2];
            for (int m = 0; m < R; m++) d[m][0] = d[m][1] = _mm256_setzero_si256();
            for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
                _mm_prefetch((const char *)(qn + k / 2 + AHEAD), _MM_HINT_T0);
                __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qn + k / 2)));
                __m256i even = _mm256_and_si256(w, low4), odd = _mm256_srli_epi16(w, 4);
                for (int m = 0; m < R; m++) {
                    const int16_t *xm = xq + m * k_total + k;
                    d[m][0] = _mm256_add_epi32(d[m][0], _mm256_madd_epi16(even, _mm256_loadu_si256((const __m256i *)xm)));
                    d[m][1] = _mm256_add_epi32(d[m][1], _mm256_madd_epi16(odd, _mm256_loadu_si256((const __m256i *)(xm + 16))));
                }
            }
            for (int m = 0; m < R; m++) dot[m][j] = _mm256_add_epi32(d[m][0], d[m][1]);
        }
        const __m256 s = load_part(sn, g0, c, flags & S_BF16);
        const __m256i z = load_part_u8(zn, g0, c);
        for (int m = 0; m < R; m++) {
            __m256i exact = _mm256_sub_epi32(sum_each(dot[m]), _mm256_mullo_epi32(z, load_part_i32(xsum, m * groups + g0, c)));
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), _mm256_mul_ps(s, load_part(xs, m * groups + g0, c, 0)), acc[m]);
        }
    }
    for (int m = 0; m < R; m++) sums[m] = hsum(acc[m]);
}

/* Groups whose products and sums stay in int32: a group's sum of products, less the zero point
 * times its activations' sum, is at most 15 * 32767 * G. */
static int group_fits(int64_t group) { return group <= 4096; }

/* G a multiple of 32 dividing K. bf16 activations (and the fused step's, X_Q16) take the int16
 * route (one thread, pangu-1b's shapes: ~50 G weights/s from L2 against 17 for per-32 scales
 * summed in fp32, and 6 for the fp32 route at four rows); fp32 activations take the fp32 one. */
int pangu_avx2_int4_team(const void *x, const uint8_t *q, const void *scales, const uint8_t *zeros,
                         const void *bias, void *y, int64_t m_total, int64_t n_total, int64_t k_total,
                         int64_t group, int flags) {
    if (group <= 0 || group % 32 != 0 || k_total % group != 0) return -1;
    const int64_t blocks = k_total / group;
    const int64_t scale_size = flags & S_BF16 ? 2 : 4;
    if ((flags & (X_BF16 | X_Q16)) && group_fits(group)) {
        int16_t *xq = NULL;
        float *xs = NULL;
        int32_t *xsum = NULL;
        const int failed = q16_blocks(x, flags & X_BF16, m_total, k_total, group, 1, &xq, &xs, &xsum) != 0;
#pragma omp for schedule(static) nowait
        for (int64_t n = 0; n < n_total; n++) {
            const uint8_t *zn = zeros == NULL ? NULL : zeros + n * blocks;
            const char *sn = (const char *)scales + n * blocks * scale_size;
            for (int64_t m0 = 0; m0 < m_total && !failed; m0 += ROWS) {
                int rows = m_total - m0 < ROWS ? (int)(m_total - m0) : ROWS;
                float sums[ROWS];
                BY_ROWS(int4_rows_q16, xq + m0 * k_total, xs + m0 * blocks, xsum + m0 * blocks, q + n * (k_total / 2),
                        sn, zn, k_total, group, flags, sums)
                char *ym = (char *)y + m0 * n_total * (flags & X_BF16 ? 2 : 4);
                write_rows(rows, sums, bias, ym, n, n_total, flags);
            }
        }
        free3(xq, xs, xsum);
        return failed ? -1 : 0;
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

/* ---- int4, tiled (`quant.weights.to_tiles`): 8 output rows at a time against activations
 * rounded to int8 per block of 32, as llama.cpp's q4_0 x q8_0 and ONNX Runtime's MatMulNBits at
 * accuracy level 4 round them ----
 * Codes [N/8, K/8, 8, 4] bytes: tile t, step s, row j, byte i holds the codes of row 8t + j at
 * k = 8s + i (low nibble) and 8s + 4 + i (high nibble). One 32-byte load is then 64 codes, 8 rows
 * x 8 k; each 32-bit lane is one row, so a block's scales, zero points and float work are vector
 * operations over 8 rows, and `_mm256_maddubs_epi16` (codes unsigned, activations signed, 32
 * pairs) against the 4 activations broadcast to every lane multiplies 32 pairs at once: about 4
 * vector operations per 32 weights at one activation row, against 7 for the int16 route. */

/* x [M, K] rounded to int8 per block of 32 (-127..127, scale max|x| / 127: `xs` [M K / 32], and
 * the block's sum of int8 values as fp32, `xsum`, for the zero points). A block holding an
 * infinity or NaN gets a NaN scale, so it reaches the output as in fp32. */
static int q8_blocks(const void *x, int x_bf16, int64_t m_total, int64_t k_total, int8_t **xq, float **xs,
                     float **xsum) {
    const int64_t blocks = m_total * k_total / 32;
    *xq = alloc64(m_total * k_total);
    *xs = alloc64(sizeof(float) * blocks);
    *xsum = alloc64(sizeof(float) * blocks);
    if (*xq == NULL || *xs == NULL || *xsum == NULL) {
        free3(*xq, *xs, *xsum);
        *xq = NULL;
        *xs = *xsum = NULL;
        return -1;
    }
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < blocks; b++) {
        __m256 v[4], big = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
        for (int u = 0; u < 4; u++) {
            v[u] = load8(x, 32 * b + 8 * u, x_bf16);
            big = _mm256_max_ps(big, _mm256_and_ps(v[u], magnitude));
            odd = _mm256_or_ps(odd, _mm256_cmp_ps(v[u], v[u], _CMP_UNORD_Q));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(big), _mm256_extractf128_ps(big, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        const float top = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        const int finite = _mm256_movemask_ps(odd) == 0 && top <= 3.4e38f;
        const __m256 inv = _mm256_set1_ps(finite && top > 0.0f ? 127.0f / top : 0.0f);
        __m256i c[4];
        for (int u = 0; u < 4; u++) c[u] = _mm256_cvtps_epi32(_mm256_mul_ps(v[u], inv));
        __m256i lo = pack16(c[0], c[1]), hi = pack16(c[2], c[3]); /* int16, elements 0-15, 16-31 */
        __m256i total = _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, ones));
        _mm256_storeu_si256((__m256i *)(*xq + 32 * b), _mm256_permute4x64_epi64(_mm256_packs_epi16(lo, hi), 0xD8));
        (*xs)[b] = finite ? top / 127.0f : NAN;
        (*xsum)[b] = hsum(_mm256_cvtepi32_ps(total)); /* |sum| <= 32 * 127: exact */
    }
    return 0;
}

/* The values of rows 8t .. 8t + 7 (the first `rows` of them; the rest 0) in column g of a
 * [N, groups] array (fp32 / bf16 / uint8). */
static inline __m256 column8(const void *p, int64_t t, int rows, int64_t g, int64_t groups, int bf16) {
    float v[8] = {0};
    for (int j = 0; j < rows; j++) v[j] = load_f(p, (8 * t + j) * groups + g, bf16);
    return _mm256_loadu_ps(v);
}

static inline __m256 column8_u8(const uint8_t *p, int64_t t, int rows, int64_t g, int64_t groups) {
    if (p == NULL) return _mm256_set1_ps(8.0f);
    float v[8] = {0};
    for (int j = 0; j < rows; j++) v[j] = (float)p[(8 * t + j) * groups + g];
    return _mm256_loadu_ps(v);
}

/* acc[m] lane j += the product of tile t (rows 8t + j, j < valid) with activation rows m < R. */
static inline __attribute__((always_inline)) void int4_tile(const int R, const int8_t *xq, const float *xs,
                                                            const float *xsum, const uint8_t *tile, const void *scales,
                                                            const uint8_t *zeros, int64_t t, int valid, int64_t k_total,
                                                            int64_t group, int flags, __m256 *acc) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const int64_t groups = k_total / group;
    for (int m = 0; m < R; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const __m256 ws = column8(scales, t, valid, g, groups, flags & S_BF16), z = column8_u8(zeros, t, valid, g, groups);
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
            __m256i d[ROWS];
            for (int m = 0; m < R; m++) d[m] = _mm256_setzero_si256();
            for (int s = 0; s < 4; s++) {
                const uint8_t *w8 = tile + (k / 8 + s) * 32;
                if (s % 2 == 0) _mm_prefetch((const char *)(w8 + AHEAD), _MM_HINT_T0);
                const __m256i w = _mm256_loadu_si256((const __m256i *)w8);
                const __m256i lo = _mm256_and_si256(w, low4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
                for (int m = 0; m < R; m++) {
                    const int8_t *xm = xq + m * k_total + k + 8 * s;
                    int32_t a, b;
                    memcpy(&a, xm, 4);
                    memcpy(&b, xm + 4, 4);
                    d[m] = _mm256_add_epi16(d[m], _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(a)),
                                                                   _mm256_maddubs_epi16(hi, _mm256_set1_epi32(b))));
                }
            }
            for (int m = 0; m < R; m++) { /* |d| <= 8 * 2 * 15 * 127 per int16 lane: exact */
                const int64_t b = (m * k_total + k) / 32;
                __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(d[m], ones));
                dot = _mm256_fnmadd_ps(z, _mm256_set1_ps(xsum[b]), dot); /* sum (c - z) x, exact */
                acc[m] = _mm256_fmadd_ps(dot, _mm256_mul_ps(ws, _mm256_set1_ps(xs[b])), acc[m]);
            }
        }
    }
}

/* y [M, N] = x [M, K] W.T + bias for W tiled (ceil(N / 8) tiles, the last one's rows past N
 * padding); G a multiple of 32 dividing K. */
int pangu_avx2_int4t_team(const void *x, const uint8_t *tiles, const void *scales, const uint8_t *zeros,
                          const void *bias, void *y, int64_t m_total, int64_t n_total, int64_t k_total,
                          int64_t group, int flags) {
    if (group <= 0 || group % 32 != 0 || k_total % group != 0) return -1;
    int8_t *xq = NULL;
    float *xs = NULL, *xsum = NULL;
    const int failed = q8_blocks(x, flags & X_BF16, m_total, k_total, &xq, &xs, &xsum) != 0;
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < (n_total + 7) / 8; t++) {
        const uint8_t *tile = tiles + t * (k_total / 8) * 32;
        const int valid = n_total - 8 * t < 8 ? (int)(n_total - 8 * t) : 8;
        for (int64_t m0 = 0; m0 < m_total && !failed; m0 += ROWS) {
            const int rows = m_total - m0 < ROWS ? (int)(m_total - m0) : ROWS;
            __m256 acc[ROWS];
            BY_ROWS(int4_tile, xq + m0 * k_total, xs + m0 * k_total / 32, xsum + m0 * k_total / 32, tile, scales,
                    zeros, t, valid, k_total, group, flags, acc)
            for (int m = 0; m < rows; m++) {
                float out[8];
                _mm256_storeu_ps(out, acc[m]);
                for (int j = 0; j < valid; j++) {
                    const float b = bias == NULL ? 0.0f : load_f(bias, 8 * t + j, flags & B_BF16);
                    store_f(y, (m0 + m) * n_total + 8 * t + j, out[j] + b, flags & X_BF16);
                }
            }
        }
    }
    free3(xq, xs, xsum);
    return failed ? -1 : 0;
}

int pangu_avx2_int4t_linear(const void *x, const uint8_t *tiles, const void *scales, const uint8_t *zeros,
                            const void *bias, void *y, int64_t m_total, int64_t n_total, int64_t k_total,
                            int64_t group, int flags, int threads) {
    ON_THREADS(threads, pangu_avx2_int4t_team(x, tiles, scales, zeros, bias, y, m_total, n_total, k_total, group, flags));
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
