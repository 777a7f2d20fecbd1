/* Weight-only int8 matrix product for few rows of bf16 activations, x86-64 with AVX-512F.
 *
 * y[m, n] = bf16(scales[n] * sum_k float(x[m, k]) * w[n, k])   for m < M, n < N
 *
 * x bf16 [M, K], w int8 [N, K] (row-major), scales bf16 [N], y bf16 [M, N]; K % 32 == 0.
 * Each output row n is one pass over w[n] (16 int8 -> 16 fp32 per step, two accumulators per
 * activation row); activation rows go 4 at a time, so w is read once per 4 rows. Output rows are
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
