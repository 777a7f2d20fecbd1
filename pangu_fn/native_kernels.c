/* Weight-streaming matrix products for few rows of bf16 activations, x86-64 with AVX-512.
 *
 * Decoding multiplies one (or a few) activation rows by every weight once, so its speed is the
 * speed at which weights stream from memory. Each kernel makes one pass over its weight per
 * few activation rows (int4: ROWS, bf16: BF16_ROWS, int8: INT8_ROWS), output rows shared among
 * OpenMP threads (torch's own libgomp: native.py loads this library after torch). Outputs are summed in fp32 and rounded once to bf16.
 * Built by native.py with -O3 -march=native -fopenmp; the bf16 and int4 kernels need
 * AVX512-BF16 (`pangu_native_has_bf16` says whether they were compiled in).
 *
 *   int8: y = bf16(scales[n] * sum_k x[m, k] w[n, k])        w int8 [N, K], scales bf16 [N]
 *   bf16: y = bf16(sum_k x[m, k] w[n, k] + bias[n])           w bf16 [N, K], bias bf16 [N] or NULL
 *   int4: y = bf16(sum_g scales[n, g] sum_{k in g} x[m, k] (c[n, k] - zero[n, g]) + bias[n])
 *         c: ONNX MatMulNBits bytes [N, K/2] (element 2i in the low nibble of byte i),
 *         scales bf16 [N, K/G], zeros uint8 [N, K/G] or NULL (zero 8), bias bf16 [N] or NULL
 *   int4 dequantize: w[n, k] = bf16((c[n, k] - zero[n, g]) * scales[n, g]), for prefill-sized products
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INT8_ROWS 4
#define ROWS 8 /* int4 */
/* The int4 loop does enough work per cache line that too few lines are in flight from memory
 * unless fetched ahead: 1-2 KiB ahead took 768 x 3072 from 18 to 22 GB/s (two threads). */
#define INT4_PREFETCH 1536

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

static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* A constant row count R after inlining keeps the accumulators in registers: BY_ROWS for up
 * to ROWS (8) rows, BF16_BY_ROWS for up to BF16_ROWS (6). */
#define FEW_ROWS(F, ...)                                                                             \
    case 1: F(1, __VA_ARGS__); break;                                                                \
    case 2: F(2, __VA_ARGS__); break;                                                                \
    case 3: F(3, __VA_ARGS__); break;                                                                \
    case 4: F(4, __VA_ARGS__); break;                                                                \
    case 5: F(5, __VA_ARGS__); break;
#define BY_ROWS(F, ...)                                                                              \
    switch (rows) {                                                                                  \
        FEW_ROWS(F, __VA_ARGS__)                                                                     \
        case 6: F(6, __VA_ARGS__); break;                                                            \
        case 7: F(7, __VA_ARGS__); break;                                                            \
        default: F(8, __VA_ARGS__); break;                                                           \
    }
#define BF16_BY_ROWS(F, ...)                                                                         \
    switch (rows) {                                                                                  \
        FEW_ROWS(F, __VA_ARGS__)                                                                     \
        default: F(6, __VA_ARGS__); break;                                                           \
    }

/* ---- int8: 16 weights at a time to fp32, two accumulators per activation row ---- */

static void rows_times_int8(const float *xf, int rows, const int8_t *w, const uint16_t *scales,
                            uint16_t *y, int64_t n_total, int64_t k_total, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < n_total; n++) {
        const int8_t *wn = w + n * k_total;
        __m512 acc[INT8_ROWS][2];
        for (int m = 0; m < INT8_ROWS; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
        for (int64_t k = 0; k < k_total; k += 32) {
            __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wn + k))));
            __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wn + k + 16))));
            for (int m = 0; m < rows; m++) {
                acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xf + m * k_total + k), acc[m][0]);
                acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xf + m * k_total + k + 16), acc[m][1]);
            }
        }
        float s = bf16_to_f32(scales[n]);
        for (int m = 0; m < rows; m++)
            y[m * n_total + n] = f32_to_bf16(s * _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])));
    }
}

/* Returns 0, or -1 when K is not a multiple of 32 or memory runs out (nothing written). */
int pangu_int8_linear_bf16(const uint16_t *x, const int8_t *w, const uint16_t *scales, uint16_t *y,
                           int64_t m_total, int64_t n_total, int64_t k_total, int threads) {
    if (k_total % 32 != 0) return -1;
    float *xf = alloc64(sizeof(float) * INT8_ROWS * k_total);
    if (xf == NULL) return -1;
    for (int64_t m0 = 0; m0 < m_total; m0 += INT8_ROWS) {
        int rows = m_total - m0 < INT8_ROWS ? (int)(m_total - m0) : INT8_ROWS;
        for (int64_t i = 0; i < rows * k_total; i++) xf[i] = bf16_to_f32(x[m0 * k_total + i]);
        rows_times_int8(xf, rows, w, scales, y + m0 * n_total, n_total, k_total, threads);
    }
    free(xf);
    return 0;
}

#ifdef __AVX512BF16__
int pangu_native_has_bf16(void) { return 1; }

/* ---- bf16: vdpbf16ps multiplies 32 weights by 32 activations per instruction ----
 * Four outputs at a time: each activation vector loaded is used against four weight rows, and
 * the four outputs' accumulators are reduced together (one transposing tree instead of four
 * horizontal sums, which cost as much as the products at K = 256). Up to BF16_ROWS activation
 * rows share one pass over the weights; U = 2 accumulators per output when few rows leave too
 * few independent chains to hide the instruction's latency. */

#define BF16_ROWS 6

/* [sum(a), sum(b), sum(c), sum(d)] */
static inline __attribute__((always_inline)) __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* y[m, n .. n+3] for R rows of x; K a multiple of 32. The four weight rows are one contiguous
 * block, read 64 bytes of each row per step; interleaved reads confuse the hardware prefetcher
 * (half speed from memory at one row), so each step prefetches the same share of the next block. */
static inline __attribute__((always_inline)) void bf16_four(const int R, const uint16_t *x, const uint16_t *w,
                                                            const uint16_t *bias, uint16_t *y, int64_t n,
                                                            int64_t n_total, int64_t k_total) {
    const int U = R <= 2 ? 2 : 1;
    __m512 acc[BF16_ROWS][4][2];
    for (int m = 0; m < R; m++)
        for (int j = 0; j < 4; j++) acc[m][j][0] = acc[m][j][1] = _mm512_setzero_ps();
    const uint16_t *wn = w + n * k_total;
    const char *ahead = (const char *)(wn + 4 * k_total);
    int64_t k = 0;
    for (; k + 32 * U <= k_total; k += 32 * U)
        for (int u = 0; u < U; u++) {
            for (int j = 0; j < 4; j++) _mm_prefetch(ahead + (k + 32 * u) * 8 + 64 * j, _MM_HINT_T0);
            __m512bh wv[4];
            for (int j = 0; j < 4; j++) wv[j] = (__m512bh)_mm512_loadu_si512(wn + j * k_total + k + 32 * u);
            for (int m = 0; m < R; m++) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * k_total + k + 32 * u);
                for (int j = 0; j < 4; j++) acc[m][j][u] = _mm512_dpbf16_ps(acc[m][j][u], wv[j], xv);
            }
        }
    for (; k < k_total; k += 32) { /* U == 2 and K % 64 == 32 */
        for (int j = 0; j < 4; j++) _mm_prefetch(ahead + k * 8 + 64 * j, _MM_HINT_T0);
        for (int m = 0; m < R; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * k_total + k);
            for (int j = 0; j < 4; j++)
                acc[m][j][0] = _mm512_dpbf16_ps(acc[m][j][0], (__m512bh)_mm512_loadu_si512(wn + j * k_total + k), xv);
        }
    }
    __m128 b = bias == NULL ? _mm_setzero_ps()
                            : _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)(bias + n))), 16));
    for (int m = 0; m < R; m++) {
        if (U == 2)
            for (int j = 0; j < 4; j++) acc[m][j][0] = _mm512_add_ps(acc[m][j][0], acc[m][j][1]);
        __m128 out = _mm_add_ps(reduce4(acc[m][0][0], acc[m][1][0], acc[m][2][0], acc[m][3][0]), b);
        _mm_storel_epi64((__m128i *)(y + m * n_total + n), (__m128i)_mm_cvtneps_pbh(out));
    }
}

/* One output: its weight row is read once, straight through, with two accumulators per
 * activation row. For a single activation row this is the fastest order from memory (the
 * four-output blocks run 15-20% slower there despite prefetching); it also takes the N % 4 tail. */
static inline __attribute__((always_inline)) void bf16_one(const int R, const uint16_t *x, const uint16_t *w,
                                                           const uint16_t *bias, uint16_t *y, int64_t n,
                                                           int64_t n_total, int64_t k_total) {
    const uint16_t *wn = w + n * k_total;
    __m512 acc[BF16_ROWS][2];
    for (int m = 0; m < R; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= k_total; k += 64) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wn + k), w1 = (__m512bh)_mm512_loadu_si512(wn + k + 32);
        for (int m = 0; m < R; m++) {
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_loadu_si512(x + m * k_total + k));
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, (__m512bh)_mm512_loadu_si512(x + m * k_total + k + 32));
        }
    }
    if (k < k_total) { /* K % 64 == 32 */
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wn + k);
        for (int m = 0; m < R; m++)
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_loadu_si512(x + m * k_total + k));
    }
    float b = bias == NULL ? 0.0f : bf16_to_f32(bias[n]);
    for (int m = 0; m < R; m++)
        y[m * n_total + n] = f32_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + b);
}

/* Returns 0, or -1 when K is not a multiple of 32. Rows are taken in equal chunks of at most
 * BF16_ROWS (8 rows: 4 + 4); a single row goes one output at a time. */
int pangu_bf16_linear(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                      int64_t m_total, int64_t n_total, int64_t k_total, int threads) {
    if (k_total % 32 != 0) return -1;
    int64_t chunks = (m_total + BF16_ROWS - 1) / BF16_ROWS, blocks = m_total == 1 ? 0 : n_total / 4;
    for (int64_t c = 0, m0 = 0; c < chunks; c++) {
        int rows = (int)((m_total - m0) / (chunks - c));
        const uint16_t *xm = x + m0 * k_total;
        uint16_t *ym = y + m0 * n_total;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t i = 0; i < blocks + n_total - 4 * blocks; i++) {
            if (i < blocks)
                BF16_BY_ROWS(bf16_four, xm, w, bias, ym, 4 * i, n_total, k_total)
            else
                BF16_BY_ROWS(bf16_one, xm, w, bias, ym, 3 * blocks + i, n_total, k_total)
        }
        m0 += rows;
    }
    return 0;
}

/* ---- int4 ----
 * 64 bytes of codes (128 weights) per step. A code c becomes the bf16 number 128 + c by putting
 * the byte 0x43 above it (exact), so two rounds of byte unpacking (lane-local: a 128-bit lane of
 * codes, 32 weights, stays in its lane) give four vectors of 32 bf16 weights for vdpbf16ps. The
 * activations are permuted once per call to the order the unpacking leaves the weights in, and
 * the 128 and the zero point leave through per-group sums of the activations:
 *   sum_k x (c - z) = sum_k x (128 + c) - (128 + z) sum_k x.
 * Each 128-bit lane of a step's products belongs to one group (G >= 32), so one permute spreads
 * the groups' scales over the lanes and one FMA applies them. */

static inline __attribute__((always_inline)) void int4_row(const int R, const uint16_t *xp, const float *xsum,
                                                           const uint8_t *qn, const uint16_t *sn,
                                                           const uint8_t *zn, int64_t k_total, int64_t group,
                                                           float *sf, float *out) {
    const int64_t blocks = k_total / group;
    __m512 acc[ROWS];
    for (int m = 0; m < R; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b += 16) { /* scales to fp32; subtract (128 + z) s xsum */
        __mmask16 mask = blocks - b >= 16 ? 0xFFFF : (__mmask16)((1u << (blocks - b)) - 1);
        __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, sn + b)), 16));
        _mm512_storeu_ps(sf + b, s);
        __m512 z = zn == NULL ? _mm512_set1_ps(136.0f)
                              : _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, zn + b))),
                                              _mm512_set1_ps(128.0f));
        __m512 sz = _mm512_mul_ps(s, z);
        for (int m = 0; m < R; m++) acc[m] = _mm512_fnmadd_ps(sz, _mm512_maskz_loadu_ps(mask, xsum + m * blocks + b), acc[m]);
    }
    const __m512i low4 = _mm512_set1_epi8(0x0F), exponent = _mm512_set1_epi8(0x43);
    const int lanes_per_group = group >= 128 ? 4 : (int)(group / 32); /* 128-bit lanes */
    const __m512i lane_group = _mm512_set_epi32(3 / lanes_per_group, 3 / lanes_per_group, 3 / lanes_per_group,
                                                3 / lanes_per_group, 2 / lanes_per_group, 2 / lanes_per_group,
                                                2 / lanes_per_group, 2 / lanes_per_group, 1 / lanes_per_group,
                                                1 / lanes_per_group, 1 / lanes_per_group, 1 / lanes_per_group, 0, 0, 0, 0);
    for (int64_t c = 0; c < k_total / 128; c++) {
        __m512i v = _mm512_loadu_si512(qn + c * 64);
        _mm_prefetch((const char *)(qn + c * 64 + INT4_PREFETCH), _MM_HINT_T0);
        __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        __m512i first = _mm512_unpacklo_epi8(lo, hi), second = _mm512_unpackhi_epi8(lo, hi);
        __m512bh w0 = (__m512bh)_mm512_unpacklo_epi8(first, exponent), w1 = (__m512bh)_mm512_unpackhi_epi8(first, exponent);
        __m512bh w2 = (__m512bh)_mm512_unpacklo_epi8(second, exponent), w3 = (__m512bh)_mm512_unpackhi_epi8(second, exponent);
        __m512 scale = _mm512_permutexvar_ps(lane_group, _mm512_loadu_ps(sf + c * 128 / group));
        for (int m = 0; m < R; m++) {
            const uint16_t *xc = xp + m * k_total + c * 128;
            __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), w0, (__m512bh)_mm512_loadu_si512(xc));
            d = _mm512_dpbf16_ps(d, w1, (__m512bh)_mm512_loadu_si512(xc + 32));
            d = _mm512_dpbf16_ps(d, w2, (__m512bh)_mm512_loadu_si512(xc + 64));
            d = _mm512_dpbf16_ps(d, w3, (__m512bh)_mm512_loadu_si512(xc + 96));
            acc[m] = _mm512_fmadd_ps(d, scale, acc[m]);
        }
    }
    for (int m = 0; m < R; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
}

/* Activation row x [K] in the unpacked weights' order, and its per-group sums. */
static void int4_prepare(const uint16_t *x, int64_t k_total, int64_t group, uint16_t *xp, float *xsum) {
    for (int64_t c = 0; c < k_total; c += 128)
        for (int v = 0; v < 4; v++)          /* weight vector v of the step */
            for (int lane = 0; lane < 4; lane++)
                for (int j = 0; j < 8; j++) xp[c + 32 * v + 8 * lane + j] = x[c + 32 * lane + 8 * v + j];
    for (int64_t b = 0; b < k_total / group; b++) {
        float total = 0.0f;
        for (int64_t j = b * group; j < (b + 1) * group; j++) total += bf16_to_f32(x[j]);
        xsum[b] = total;
    }
}

/* Returns 0, or -1 when K is not a multiple of 128, G is not 32, 64 or a multiple of 128
 * dividing K, or memory runs out (y is then not to be used). */
int pangu_int4_linear_bf16(const uint16_t *x, const uint8_t *q, const uint16_t *scales, const uint8_t *zeros,
                           const uint16_t *bias, uint16_t *y, int64_t m_total, int64_t n_total, int64_t k_total, int64_t group,
                           int threads) {
    if (k_total % 128 || k_total % group || !(group == 32 || group == 64 || group % 128 == 0)) return -1;
    const int64_t blocks = k_total / group;
    uint16_t *xp = alloc64(sizeof(uint16_t) * ROWS * k_total);
    float *xsum = alloc64(sizeof(float) * ROWS * blocks);
    int status = xp == NULL || xsum == NULL ? -1 : 0;
    for (int64_t m0 = 0; status == 0 && m0 < m_total; m0 += ROWS) {
        int rows = m_total - m0 < ROWS ? (int)(m_total - m0) : ROWS;
        for (int m = 0; m < rows; m++) int4_prepare(x + (m0 + m) * k_total, k_total, group, xp + m * k_total, xsum + m * blocks);
        uint16_t *ym = y + m0 * n_total;
#pragma omp parallel num_threads(threads)
        {
            float *sf = alloc64(sizeof(float) * (blocks + 32)); /* this thread's row of fp32 scales */
            if (sf != NULL) memset(sf, 0, sizeof(float) * (blocks + 32));
#pragma omp for schedule(static)
            for (int64_t n = 0; n < n_total; n++) {
                if (sf == NULL) continue;
                float out[ROWS];
                const uint8_t *zn = zeros == NULL ? NULL : zeros + n * blocks;
                BY_ROWS(int4_row, xp, xsum, q + n * (k_total / 2), scales + n * blocks, zn, k_total, group, sf, out)
                float b = bias == NULL ? 0.0f : bf16_to_f32(bias[n]);
                for (int m = 0; m < rows; m++) ym[m * n_total + n] = f32_to_bf16(out[m] + b);
            }
            if (sf == NULL) {
#pragma omp atomic write
                status = -1;
            }
            free(sf);
        }
    }
    free(xp);
    free(xsum);
    return status;
}
/* Returns 0, or -1 when G is not a multiple of 32 dividing K. One rounding, as
 * `(code - zero) * scale` in bf16 arithmetic gives (code - zero is exact). */
int pangu_int4_dequantize_bf16(const uint8_t *q, const uint16_t *scales, const uint8_t *zeros, uint16_t *w,
                               int64_t n_total, int64_t k_total, int64_t group, int threads) {
    if (group % 32 || k_total % group) return -1;
    const int64_t blocks = k_total / group;
    const __m512i low4 = _mm512_set1_epi32(0x0F);
    uint16_t order[32]; /* the two halves of cvtne2ps (low nibbles, high nibbles) interleaved */
    for (int j = 0; j < 32; j++) order[j] = (uint16_t)(j % 2 == 0 ? j / 2 : 16 + j / 2);
    const __m512i interleave = _mm512_loadu_si512(order);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < n_total; n++) {
        for (int64_t b = 0; b < blocks; b++) {
            const __m512 s = _mm512_set1_ps(bf16_to_f32(scales[n * blocks + b]));
            const __m512 z = _mm512_set1_ps(zeros == NULL ? 8.0f : (float)zeros[n * blocks + b]);
            for (int64_t j = b * group; j < (b + 1) * group; j += 32) {
                __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + (n * k_total + j) / 2)));
                __m512 lo = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(d, low4)), z), s);
                __m512 hi = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(d, 4)), z), s);
                __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
                _mm512_storeu_si512(w + n * k_total + j, _mm512_permutexvar_epi16(interleave, both));
            }
        }
    }
    return 0;
}
#else
int pangu_native_has_bf16(void) { return 0; }
#endif
