/* Weight-only int8 and int4 matrix products for few rows of bf16 activations, x86-64 with AVX-512F.
 *
 * int8: y[m, n] = bf16(scales[n] * sum_k x[m, k] * w[n, k]); w int8 [N, K] row-major, scales bf16 [N].
 * int4: y[m, n] = bf16(sum_b scales[n, b] * sum_j (code[n, bG + j] - zero[n, b]) * x[m, bG + j]);
 *       codes in the ONNX MatMulNBits layout uint8 [N, K/G, G/2] (element 2i in the low nibble of
 *       byte i of its block, 2i + 1 in the high one), scales bf16 [N, K/G], zeros uint8 [N, K/G]
 *       or NULL (8).
 * x bf16 [M, K], y bf16 [M, N]; K % 32 == 0 (int4: G % 32 == 0). Weights are converted 16 at a
 * time to fp32 and multiplied in fp32, then each output is rounded once. Each output row n is one
 * pass over w[n]; activation rows go 4 at a time, so w is read once per 4 rows. Output rows are
 * shared among OpenMP threads (torch's own libgomp: the library is loaded after torch).
 * Built by native.py with -O3 -march=native -fopenmp.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 4

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

static void rows_times_int8(const float *xf, int rows, const int8_t *w, const uint16_t *scales,
                            uint16_t *y, int64_t n_total, int64_t k_total, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < n_total; n++) {
        const int8_t *wn = w + n * k_total;
        __m512 acc[ROWS][2];
        for (int m = 0; m < ROWS; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
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
    float *xf = aligned_alloc(64, sizeof(float) * ROWS * k_total);
    if (xf == NULL) return -1;
    for (int64_t m0 = 0; m0 < m_total; m0 += ROWS) {
        int rows = m_total - m0 < ROWS ? (int)(m_total - m0) : ROWS;
        for (int64_t i = 0; i < rows * k_total; i++) xf[i] = bf16_to_f32(x[m0 * k_total + i]);
        rows_times_int8(xf, rows, w, scales, y + m0 * n_total, n_total, k_total, threads);
    }
    free(xf);
    return 0;
}

#ifdef __AVX512BF16__
/* With AVX512-BF16 (and VL): a code c becomes the bf16 number 128 + c by setting its exponent
 * bits (0x4300 | c, exact), pairs of them meet the bf16 activations in one vdpbf16ps (twice the
 * multiply-adds of an fp32 FMA), and the 128 goes out with the zero point through the block sums.
 * Even and odd blocks accumulate apart, so that consecutive blocks do not wait on each other. */
#define INT4_ACTIVATION uint16_t
static inline __attribute__((always_inline)) void int4_block(const int R, const uint16_t *xe, const uint16_t *xo,
                                                             const float *xsum, const uint8_t *qn,
                                                             const uint16_t *sn, const uint8_t *zn, int64_t b,
                                                             int64_t blocks, int64_t group, int64_t half,
                                                             __m256 *acc, float *offset) {
    const __m256i low4 = _mm256_set1_epi16(0x0F), exponent = _mm256_set1_epi16(0x4300);
    __m256 lo_dot[ROWS], hi_dot[ROWS];
    for (int m = 0; m < R; m++) lo_dot[m] = hi_dot[m] = _mm256_setzero_ps();
    for (int64_t i = b * group / 2; i < (b + 1) * group / 2; i += 16) {
        __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qn + i)));
        __m256bh lo = (__m256bh)_mm256_or_si256(_mm256_and_si256(bytes, low4), exponent);
        __m256bh hi = (__m256bh)_mm256_or_si256(_mm256_srli_epi16(bytes, 4), exponent);
        for (int m = 0; m < R; m++) {
            lo_dot[m] = _mm256_dpbf16_ps(lo_dot[m], lo, (__m256bh)_mm256_loadu_si256((const __m256i *)(xe + m * half + i)));
            hi_dot[m] = _mm256_dpbf16_ps(hi_dot[m], hi, (__m256bh)_mm256_loadu_si256((const __m256i *)(xo + m * half + i)));
        }
    }
    float s = bf16_to_f32(sn[b]);
    float sz = s * (128.0f + (zn == NULL ? 8.0f : (float)zn[b]));
    __m256 sv = _mm256_set1_ps(s);
    for (int m = 0; m < R; m++) {
        acc[m] = _mm256_fmadd_ps(_mm256_add_ps(lo_dot[m], hi_dot[m]), sv, acc[m]);
        offset[m] += sz * xsum[m * blocks + b];
    }
}

static inline __attribute__((always_inline)) void int4_row(const int R, const uint16_t *xe, const uint16_t *xo,
                                                           const float *xsum, const uint8_t *qn,
                                                           const uint16_t *sn, const uint8_t *zn, int64_t blocks,
                                                           int64_t group, int64_t half, float *out) {
    __m256 acc_even[ROWS], acc_odd[ROWS];
    float offset_even[ROWS], offset_odd[ROWS];
    for (int m = 0; m < R; m++) {
        acc_even[m] = acc_odd[m] = _mm256_setzero_ps();
        offset_even[m] = offset_odd[m] = 0.0f;
    }
    int64_t b = 0;
    for (; b + 1 < blocks; b += 2) {
        int4_block(R, xe, xo, xsum, qn, sn, zn, b, blocks, group, half, acc_even, offset_even);
        int4_block(R, xe, xo, xsum, qn, sn, zn, b + 1, blocks, group, half, acc_odd, offset_odd);
    }
    if (b < blocks) int4_block(R, xe, xo, xsum, qn, sn, zn, b, blocks, group, half, acc_even, offset_even);
    for (int m = 0; m < R; m++) {
        __m256 both = _mm256_add_ps(acc_even[m], acc_odd[m]);
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(both), _mm256_extractf128_ps(both, 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        v = _mm_add_ss(v, _mm_movehdup_ps(v));
        out[m] = _mm_cvtss_f32(v) - (offset_even[m] + offset_odd[m]);
    }
}
#else
/* One output row of the int4 product for R (a constant after inlining) activation rows, so that
 * the accumulators stay in registers. */
#define INT4_ACTIVATION float
static inline __attribute__((always_inline)) void int4_row(const int R, const float *xe, const float *xo,
                                                           const float *xsum, const uint8_t *qn,
                                                           const uint16_t *sn, const uint8_t *zn, int64_t blocks,
                                                           int64_t group, int64_t half, float *out) {
    const __m512i low4 = _mm512_set1_epi32(0x0F);
    __m512 acc[ROWS];
    float offset[ROWS];
    for (int m = 0; m < R; m++) {
        acc[m] = _mm512_setzero_ps();
        offset[m] = 0.0f;
    }
    for (int64_t b = 0; b < blocks; b++) {
        __m512 dot[ROWS];
        for (int m = 0; m < R; m++) dot[m] = _mm512_setzero_ps();
        for (int64_t i = b * group / 2; i < (b + 1) * group / 2; i += 16) {
            __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qn + i)));
            __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, low4));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
            for (int m = 0; m < R; m++) {
                dot[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xe + m * half + i), dot[m]);
                dot[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xo + m * half + i), dot[m]);
            }
        }
        float s = bf16_to_f32(sn[b]);
        float sz = s * (zn == NULL ? 8.0f : (float)zn[b]);
        __m512 sv = _mm512_set1_ps(s);
        for (int m = 0; m < R; m++) {
            acc[m] = _mm512_fmadd_ps(dot[m], sv, acc[m]);
            offset[m] += sz * xsum[m * blocks + b];
        }
    }
    for (int m = 0; m < R; m++) out[m] = _mm512_reduce_add_ps(acc[m]) - offset[m];
}

#endif

static void rows_times_int4(const INT4_ACTIVATION *xe, const INT4_ACTIVATION *xo, const float *xsum, int rows, const uint8_t *q,
                            const uint16_t *scales, const uint8_t *zeros, uint16_t *y, int64_t n_total,
                            int64_t k_total, int64_t group, int threads) {
    const int64_t blocks = k_total / group, half = k_total / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < n_total; n++) {
        const uint8_t *qn = q + n * half, *zn = zeros == NULL ? NULL : zeros + n * blocks;
        const uint16_t *sn = scales + n * blocks;
        float out[ROWS];
        switch (rows) {
            case 1: int4_row(1, xe, xo, xsum, qn, sn, zn, blocks, group, half, out); break;
            case 2: int4_row(2, xe, xo, xsum, qn, sn, zn, blocks, group, half, out); break;
            case 3: int4_row(3, xe, xo, xsum, qn, sn, zn, blocks, group, half, out); break;
            default: int4_row(4, xe, xo, xsum, qn, sn, zn, blocks, group, half, out); break;
        }
        for (int m = 0; m < rows; m++) y[m * n_total + n] = f32_to_bf16(out[m]);
    }
}

/* Returns 0, or -1 when K or G do not fit (see above) or memory runs out (nothing written). */
int pangu_int4_linear_bf16(const uint16_t *x, const uint8_t *q, const uint16_t *scales, const uint8_t *zeros,
                           uint16_t *y, int64_t m_total, int64_t n_total, int64_t k_total, int64_t group,
                           int threads) {
    if (group % 32 != 0 || k_total % group != 0) return -1;
    const int64_t half = k_total / 2, blocks = k_total / group;
    INT4_ACTIVATION *xe = aligned_alloc(64, sizeof(INT4_ACTIVATION) * ROWS * half);
    INT4_ACTIVATION *xo = aligned_alloc(64, sizeof(INT4_ACTIVATION) * ROWS * half);
    float *xsum = malloc(sizeof(float) * ROWS * blocks);
    int status = (xe == NULL || xo == NULL || xsum == NULL) ? -1 : 0;
    for (int64_t m0 = 0; status == 0 && m0 < m_total; m0 += ROWS) {
        int rows = m_total - m0 < ROWS ? (int)(m_total - m0) : ROWS;
        for (int m = 0; m < rows; m++) {
            const uint16_t *xm = x + (m0 + m) * k_total;
            for (int64_t i = 0; i < half; i++) {  /* even and odd elements, as the nibbles hold them */
#ifdef __AVX512BF16__
                xe[m * half + i] = xm[2 * i];
                xo[m * half + i] = xm[2 * i + 1];
#else
                xe[m * half + i] = bf16_to_f32(xm[2 * i]);
                xo[m * half + i] = bf16_to_f32(xm[2 * i + 1]);
#endif
            }
            for (int64_t b = 0; b < blocks; b++) {
                float total = 0.0f;
                for (int64_t j = b * group; j < (b + 1) * group; j++) total += bf16_to_f32(xm[j]);
                xsum[m * blocks + b] = total;
            }
        }
        rows_times_int4(xe, xo, xsum, rows, q, scales, zeros, y + m0 * n_total, n_total, k_total, group, threads);
    }
    free(xe);
    free(xo);
    free(xsum);
    return status;
}
