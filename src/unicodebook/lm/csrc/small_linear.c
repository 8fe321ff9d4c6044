/* y (R, O) = x (R, K) · W (O, K)ᵀ + b, for the few rows of token-by-token decoding on a CPU.
 *
 * Decoding reads every weight once per token for one to a few dozen rows, so the product is
 * bound by how fast W streams from memory. Each thread walks its own contiguous band of W,
 * four output rows at a time, and applies them to up to three input rows per pass: 12 AVX2
 * accumulators, the four W rows stay in L1/L2 between passes, so W is read from memory once
 * whatever R is. fp32 throughout (FMA, the same maths as F.linear up to summation order).
 *
 * Built on first use by unicodebook/lm/cpu_kernel.py (cc -O3 -mavx2 -mfma -fopenmp) and
 * linked against the OpenMP runtime PyTorch has already loaded.
 */
#include <immintrin.h>
#include <stddef.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

/* OT output rows × RT input rows over the whole of K; K8 = K rounded down to a multiple of 8 */
#define TILE(OT, RT)                                                                            \
    static inline void tile_##OT##_##RT(const float *W, const float *x, float *y, const float *b, \
                                        long o, long r, long O, long K) {                      \
        __m256 acc[OT][RT];                                                                     \
        for (int i = 0; i < OT; i++)                                                            \
            for (int j = 0; j < RT; j++) acc[i][j] = _mm256_setzero_ps();                       \
        long K8 = K & ~7L, k = 0;                                                               \
        for (; k < K8; k += 8) {                                                                \
            __m256 xv[RT];                                                                      \
            for (int j = 0; j < RT; j++) xv[j] = _mm256_loadu_ps(x + (r + j) * K + k);          \
            for (int i = 0; i < OT; i++) {                                                      \
                __m256 wv = _mm256_loadu_ps(W + (o + i) * K + k);                               \
                for (int j = 0; j < RT; j++) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]); \
            }                                                                                   \
        }                                                                                       \
        for (int i = 0; i < OT; i++)                                                            \
            for (int j = 0; j < RT; j++) {                                                      \
                float s = hsum(acc[i][j]);                                                      \
                for (long kk = k; kk < K; kk++) s += W[(o + i) * K + kk] * x[(r + j) * K + kk]; \
                y[(r + j) * O + o + i] = s + (b ? b[o + i] : 0.0f);                             \
            }                                                                                   \
    }

TILE(4, 1) TILE(4, 2) TILE(4, 3) TILE(1, 1) TILE(1, 2) TILE(1, 3)

static inline void rows_4(const float *W, const float *x, float *y, const float *b, long o, long R, long O, long K) {
    long r = 0;
    for (; r + 3 <= R; r += 3) tile_4_3(W, x, y, b, o, r, O, K);
    if (R - r == 2) tile_4_2(W, x, y, b, o, r, O, K);
    else if (R - r == 1) tile_4_1(W, x, y, b, o, r, O, K);
}

static inline void rows_1(const float *W, const float *x, float *y, const float *b, long o, long R, long O, long K) {
    long r = 0;
    for (; r + 3 <= R; r += 3) tile_1_3(W, x, y, b, o, r, O, K);
    if (R - r == 2) tile_1_2(W, x, y, b, o, r, O, K);
    else if (R - r == 1) tile_1_1(W, x, y, b, o, r, O, K);
}

/* all pointers row-major and contiguous; b may be NULL */
void small_linear(const float *W, const float *x, const float *b, float *y, long R, long O, long K, int threads) {
    long O4 = O & ~3L;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long o = 0; o < O4; o += 4) rows_4(W, x, y, b, o, R, O, K);
    for (long o = O4; o < O; o++) rows_1(W, x, y, b, o, R, O, K);
}
