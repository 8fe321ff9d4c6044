/* Token-by-token decoding on a CPU, fp32: the few-row linear layer and a whole Llama-family
 * decoder layer built on it.
 *
 * small_linear: y (R, O) = x (R, K) · W (O, K)ᵀ + b, for the few rows of one decoding step.
 *
 * Decoding reads every weight once per token for one to a few dozen rows, so the product is
 * bound by how fast W streams from memory. Each thread walks its own contiguous band of W,
 * four output rows at a time, and applies them to up to three input rows per pass (AVX2: 12
 * accumulators; six with AVX-512, 24 of its 32 registers); the four W rows stay in L1/L2
 * between passes, so W is read from memory once whatever R is. While a tile computes, the next
 * tile's rows are prefetched into L2, a 1/P share of its lines in each of the P passes: with
 * short rows (K = 768: 3 KB) the hardware prefetcher would start each new tile cold, and a
 * 768 × 768 matrix streamed at 16–18 GB/s against 22–23 with the prefetch (27 for one 256 MiB
 * matrix, Xeon 2-core host; prefetching 2–8 tiles ahead gained nothing more). fp32 throughout
 * (FMA, the same maths as F.linear up to summation order).
 *
 * Built on first use by unicodebook/lm/cpu_kernel.py (cc -O3 -mavx2 -mfma -fopenmp, plus
 * -mavx512f -DUB_AVX512 on AVX-512 CPUs) and linked against the OpenMP runtime PyTorch has
 * already loaded.
 */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

/* the linear kernel's vectors: AVX2 (8 floats, tiles of 4 × 3 rows = 12 of the 16 registers)
 * or, built with -DUB_AVX512, AVX-512 (16 floats, 4 × 6 = 24 of 32): twice the FMAs per
 * instruction, which the many-row steps of batched decoding are bound by */
#ifdef UB_AVX512
typedef __m512 vec;
#define VW 16
#define RT_MAX 6
#define vload _mm512_loadu_ps
#define vzero _mm512_setzero_ps
#define vfma _mm512_fmadd_ps
#define vsum _mm512_reduce_add_ps
#else
typedef __m256 vec;
#define VW 8
#define RT_MAX 3
#define vload _mm256_loadu_ps
#define vzero _mm256_setzero_ps
#define vfma _mm256_fmadd_ps
#define vsum hsum
#endif

/* the four sums of four vectors, in order: one reduction tree instead of four */
static inline __m128 reduce4(vec a, vec b, vec c, vec d) {
#ifdef UB_AVX512
#define HALVES(v) _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))
    __m256 a8 = HALVES(a), b8 = HALVES(b), c8 = HALVES(c), d8 = HALVES(d);
#undef HALVES
#else
    __m256 a8 = a, b8 = b, c8 = c, d8 = d;
#endif
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* OT output rows × RT input rows over the whole of K; KV = K rounded down to a multiple of VW */
#define TILE(OT, RT)                                                                            \
    static inline void tile_##OT##_##RT(const float *W, const float *x, float *y, const float *b, \
                                        long o, long r, long O, long K, long p, long P) {      \
        vec acc[OT][RT];                                                                        \
        for (int i = 0; i < OT; i++)                                                            \
            for (int j = 0; j < RT; j++) acc[i][j] = vzero();                                   \
        long KV = K & ~(long)(VW - 1), k = 0;                                                   \
        const int pf = o + 2 * OT <= O;                                                     \
        for (; k < KV; k += VW) {                                                               \
            vec xv[RT];                                                                         \
            for (int j = 0; j < RT; j++) xv[j] = vload(x + (r + j) * K + k);                    \
            if (pf && (k & 15) == 0 && (k >> 4) % P == p) /* a later tile's lines, 1/P per pass */ \
                for (int i = 0; i < OT; i++) _mm_prefetch((const char *)(W + (o + OT + i) * K + k), _MM_HINT_T1); \
            for (int i = 0; i < OT; i++) {                                                      \
                vec wv = vload(W + (o + i) * K + k);                                            \
                for (int j = 0; j < RT; j++) acc[i][j] = vfma(wv, xv[j], acc[i][j]);            \
            }                                                                                   \
        }                                                                                       \
        if (OT == 4 && k == K) { /* no tail: the four outputs of each row in one store */        \
            const __m128 bias = b ? _mm_loadu_ps(b + o) : _mm_setzero_ps();                     \
            for (int j = 0; j < RT; j++)                                                        \
                _mm_storeu_ps(y + (r + j) * O + o, _mm_add_ps(bias, reduce4(acc[0][j], acc[OT > 1 ? 1 : 0][j], \
                                                                            acc[OT > 2 ? 2 : 0][j], acc[OT > 3 ? 3 : 0][j]))); \
            return;                                                                             \
        }                                                                                       \
        for (int j = 0; j < RT; j++) {                                                          \
            float sums[OT];                                                                     \
            if (OT == 4) _mm_storeu_ps(sums, reduce4(acc[0][j], acc[OT > 1 ? 1 : 0][j], acc[OT > 2 ? 2 : 0][j], acc[OT > 3 ? 3 : 0][j])); \
            else sums[0] = vsum(acc[0][j]);                                                     \
            for (int i = 0; i < OT; i++) {                                                      \
                float s = sums[i];                                                              \
                for (long kk = k; kk < K; kk++) s += W[(o + i) * K + kk] * x[(r + j) * K + kk]; \
                y[(r + j) * O + o + i] = s + (b ? b[o + i] : 0.0f);                             \
            }                                                                                   \
        }                                                                                       \
    }

#define ROWS(OT)                                                                                \
    static inline void rows_##OT(const float *W, const float *x, float *y, const float *b,     \
                                 long o, long R, long O, long K) {                             \
        long r = 0, p = 0, P = (R + RT_MAX - 1) / RT_MAX;                                       \
        for (; r + RT_MAX <= R; r += RT_MAX, p++) TILE_MAX(OT)(W, x, y, b, o, r, O, K, p, P);   \
        switch (R - r) {                                                                        \
        case 1: tile_##OT##_1(W, x, y, b, o, r, O, K, p, P); break;                             \
        case 2: tile_##OT##_2(W, x, y, b, o, r, O, K, p, P); break;                             \
        REST(OT)                                                                                \
        }                                                                                       \
    }

#ifdef UB_AVX512
TILE(4, 1) TILE(4, 2) TILE(4, 3) TILE(4, 4) TILE(4, 5) TILE(4, 6)
TILE(1, 1) TILE(1, 2) TILE(1, 3) TILE(1, 4) TILE(1, 5) TILE(1, 6)
#define TILE_MAX(OT) tile_##OT##_6
#define REST(OT)                                                                                \
    case 3: tile_##OT##_3(W, x, y, b, o, r, O, K, p, P); break;                                 \
    case 4: tile_##OT##_4(W, x, y, b, o, r, O, K, p, P); break;                                 \
    case 5: tile_##OT##_5(W, x, y, b, o, r, O, K, p, P); break;
#else
TILE(4, 1) TILE(4, 2) TILE(4, 3) TILE(1, 1) TILE(1, 2) TILE(1, 3)
#define TILE_MAX(OT) tile_##OT##_3
#define REST(OT)
#endif

ROWS(4) ROWS(1)

/* all pointers row-major and contiguous; b may be NULL */
void small_linear(const float *W, const float *x, const float *b, float *y, long R, long O, long K, int threads) {
    long O4 = O & ~3L;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long o = 0; o < O4; o += 4) rows_4(W, x, y, b, o, R, O, K);
    for (long o = O4; o < O; o++) rows_1(W, x, y, b, o, R, O, K);
}

/* ------------------------------------------------------------------------------------------
 * decode_layer: one Llama-family decoder layer for one new token per row, in place on the
 * residual stream x (R, D):
 *
 *     h = RMSNorm₁(x);  q, k, v = h·Wqᵀ + bq, h·Wkᵀ + bk, h·Wvᵀ + bv;  RoPE(q, k)
 *     append k, v to the cache at position n;  a = softmax(q·Kᵀ·scale)·V over [start_r, n]
 *     x += a·Woᵀ + bo;  h = RMSNorm₂(x);  x += (SiLU(h·Wgᵀ + bg) ⊙ (h·Wuᵀ + bu))·Wdᵀ + bd
 *
 * the arithmetic of transformers' LlamaDecoderLayer in eval mode (rotate-half RoPE with the
 * model's own cos/sin, grouped-query heads, left padding as a per-row first valid position),
 * in one call instead of ~80 ATen ops. Weights are only read; all arrays are contiguous.
 *
 *   w       ln1, Wq, bq, Wk, bk, Wv, bv, Wo, bo, ln2, Wg, bg, Wu, bu, Wd, bd (biases may be NULL)
 *   kc, vc  (R, KVH, T, hd) key / value caches, positions [0, n) filled
 *   cos,sin (R, hd) for this token's positions
 *   start   (R,) first valid cache position of each row (left padding before it)
 *   dims    R, D, H, KVH, hd, F (the MLP width), T
 *   scratch R·(2D + 2H·hd + 2KVH·hd + 2F + H·T) floats
 * ------------------------------------------------------------------------------------------ */
static void rms_norm(const float *x, const float *w, float *h, long R, long D, float eps) {
    for (long r = 0; r < R; r++) {
        const float *xr = x + r * D;
        float *hr = h + r * D;
        float ss = 0.0f;
        for (long i = 0; i < D; i++) ss += xr[i] * xr[i];
        float s = 1.0f / sqrtf(ss / (float)D + eps);
        for (long i = 0; i < D; i++) hr[i] = w[i] * (xr[i] * s);
    }
}

/* rotate-half RoPE on the heads of each row: t[i] = t[i]·cos[i] − t[i+hd/2]·sin[i], t[i+hd/2] = t[i+hd/2]·cos + t[i]·sin */
static void rope(float *t, const float *cos, const float *sin, long R, long heads, long hd) {
    long half = hd / 2;
    for (long r = 0; r < R; r++)
        for (long h = 0; h < heads; h++) {
            float *v = t + (r * heads + h) * hd;
            const float *c = cos + r * hd, *s = sin + r * hd;
            for (long i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
}

/* q·k over hd floats: four 8-wide accumulators (a scalar loop is one dependent add per element) */
static inline float dot(const float *a, const float *b, long n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    long i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* e^x for 8 floats (Cephes' expf: range reduction by ln 2 in two parts, degree-5 polynomial;
 * ~1 ulp; x is clamped to [−87.3, 88]: ~1e-38 instead of a subnormal, 1.7e38 instead of inf) */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.0f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

/* the lines of rows [t0, t1) of a (·, hd) array into L2: the next stream's bytes requested while
 * the current one computes, so two streams are in flight instead of one ramping up after the other */
static inline void prefetch_rows(const float *A, long t0, long t1, long hd) {
    for (const char *c = (const char *)(A + t0 * hd), *e = (const char *)(A + t1 * hd); c < e; c += 64)
        _mm_prefetch(c, _MM_HINT_T1);
}

/* s[t] = q·K[t]·scale for t in [t0, t1): four positions at a time, their four products
 * reduced together (hd a multiple of 8; any other hd one position at a time); meanwhile the
 * same positions of pf (the values the weighted sum reads next) are prefetched */
static void scores(const float *q, const float *K, float *s, long t0, long t1, long hd, float scale, const float *pf) {
    long t = t0;
    if (hd % 8 == 0) {
        const __m128 sc = _mm_set1_ps(scale);
        for (; t + 4 <= t1; t += 4) {
            const float *k0 = K + t * hd;
            prefetch_rows(pf, t, t + 4, hd);
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (long i = 0; i < hd; i += 8) {
                __m256 qv = _mm256_loadu_ps(q + i);
                a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
                a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + hd + i), a1);
                a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * hd + i), a2);
                a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * hd + i), a3);
            }
            __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
            _mm_storeu_ps(s + t, _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), sc));
        }
    }
    for (; t < t1; t++) s[t] = dot(q, K + t * hd, hd) * scale;
}

/* acc (NV·8 floats) = Σ_t p[t]·V[t][i : i + 8·NV] for t in [t0, t1), held in registers across all
 * positions; in the first block (i = 0) the rows [pf0, pf0 + t1 − t0) of pf are prefetched */
#define VBLOCK(NV)                                                                              \
    static inline void vblock_##NV(const float *p, const float *V, float *out, long i, long t0, long t1, long hd, \
                                   float inv, const float *pf, long pf0) {                       \
        __m256 a[NV];                                                                           \
        for (int j = 0; j < NV; j++) a[j] = _mm256_setzero_ps();                                \
        for (long t = t0; t < t1; t++) {                                                        \
            if (pf && i == 0) prefetch_rows(pf, pf0 + t - t0, pf0 + t - t0 + 1, hd);            \
            const __m256 c = _mm256_set1_ps(p[t]);                                              \
            const float *v = V + t * hd + i;                                                    \
            for (int j = 0; j < NV; j++) a[j] = _mm256_fmadd_ps(c, _mm256_loadu_ps(v + 8 * j), a[j]); \
        }                                                                                       \
        const __m256 iv = _mm256_set1_ps(inv);                                                  \
        for (int j = 0; j < NV; j++) _mm256_storeu_ps(out + i + 8 * j, _mm256_mul_ps(a[j], iv)); \
    }
VBLOCK(8) VBLOCK(4) VBLOCK(1)

/* out = inv · Σ_t p[t]·V[t] for t in [t0, t1): 64 output floats at a time in eight registers
 * (one pass over V for the usual head size of 64), then 32, then 8, then single floats;
 * meanwhile rows [pf0, pf0 + t1 − t0) of pf (the next head's keys) are prefetched */
static void weighted_sum(const float *p, const float *V, float *out, long t0, long t1, long hd, float inv,
                         const float *pf, long pf0) {
    long i = 0;
    for (; i + 64 <= hd; i += 64) vblock_8(p, V, out, i, t0, t1, hd, inv, pf, pf0);
    for (; i + 32 <= hd; i += 32) vblock_4(p, V, out, i, t0, t1, hd, inv, pf, pf0);
    for (; i + 8 <= hd; i += 8) vblock_1(p, V, out, i, t0, t1, hd, inv, pf, pf0);
    for (; i < hd; i++) {
        float a = 0.0f;
        for (long t = t0; t < t1; t++) a += p[t] * V[t * hd + i];
        out[i] = a * inv;
    }
}

void decode_layer(float *x, const float *const *w, float *kc, float *vc, const float *cos, const float *sin,
                  const long *start, long n, const long *dims, float eps, float scale, float *scratch, int threads) {
    const long R = dims[0], D = dims[1], H = dims[2], KVH = dims[3], hd = dims[4], F = dims[5], T = dims[6];
    const float *ln1 = w[0], *wq = w[1], *bq = w[2], *wk = w[3], *bk = w[4], *wv = w[5], *bv = w[6], *wo = w[7],
                *bo = w[8], *ln2 = w[9], *wg = w[10], *bg = w[11], *wu = w[12], *bu = w[13], *wd = w[14], *bd = w[15];
    float *h = scratch, *o = h + R * D, *q = o + R * D, *a = q + R * H * hd, *k = a + R * H * hd,
          *v = k + R * KVH * hd, *g = v + R * KVH * hd, *u = g + R * F, *p = u + R * F;

    rms_norm(x, ln1, h, R, D, eps);
    small_linear(wq, h, bq, q, R, H * hd, D, threads);
    small_linear(wk, h, bk, k, R, KVH * hd, D, threads);
    small_linear(wv, h, bv, v, R, KVH * hd, D, threads);
    rope(q, cos, sin, R, H, hd);
    rope(k, cos, sin, R, KVH, hd);
    for (long r = 0; r < R; r++)
        for (long j = 0; j < KVH; j++) {
            float *kd = kc + ((r * KVH + j) * T + n) * hd, *vd = vc + ((r * KVH + j) * T + n) * hd;
            for (long i = 0; i < hd; i++) kd[i] = k[(r * KVH + j) * hd + i], vd[i] = v[(r * KVH + j) * hd + i];
        }

    const long group = H / KVH;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long rh = 0; rh < R * H; rh++) {
        const long r = rh / H, hh = rh % H;
        const float *qr = q + rh * hd;
        const float *K = kc + (r * KVH + hh / group) * T * hd, *V = vc + (r * KVH + hh / group) * T * hd;
        /* the keys of the next (row, head) this thread takes, prefetched during this one's values
         * (as many rows as this one has: with other left padding a few rows more or fewer — a
         * prefetch is only a hint and never faults) */
        const long nr = (rh + 1) / H, nh = (rh + 1) % H;
        const float *nextK = rh + 1 < R * H && (hh + 1) % group == 0 ? kc + (nr * KVH + nh / group) * T * hd : NULL;
        float *pr = p + rh * T, *ar = a + rh * hd;
        float m = -INFINITY, z = 0.0f;
        scores(qr, K, pr, start[r], n + 1, hd, scale, V);
        for (long t = start[r]; t <= n; t++) m = pr[t] > m ? pr[t] : m;
        long t = start[r];
        __m256 zv = _mm256_setzero_ps(), mv = _mm256_set1_ps(m);
        for (; t + 8 <= n + 1; t += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(pr + t), mv));
            _mm256_storeu_ps(pr + t, e);
            zv = _mm256_add_ps(zv, e);
        }
        z = hsum(zv);
        for (; t <= n; t++) z += (pr[t] = expf(pr[t] - m));
        weighted_sum(pr, V, ar, start[r], n + 1, hd, 1.0f / z, nextK, nextK ? start[nr] : 0);
    }

    small_linear(wo, a, bo, o, R, D, H * hd, threads);
    for (long i = 0; i < R * D; i++) x[i] += o[i];
    rms_norm(x, ln2, h, R, D, eps);
    small_linear(wg, h, bg, g, R, F, D, threads);
    small_linear(wu, h, bu, u, R, F, D, threads);
    long i = 0;  /* SiLU(g) ⊙ u, 8 at a time */
    for (; i + 8 <= R * F; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), _mm256_loadu_ps(u + i)));
    }
    for (; i < R * F; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    small_linear(wd, g, bd, o, R, D, F, threads);
    for (i = 0; i < R * D; i++) x[i] += o[i];
}
