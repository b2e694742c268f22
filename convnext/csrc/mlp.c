/* The ConvNeXt block's MLP for float32 training: pwconv1 -> exact GELU -> pwconv2 (+ shortcut) on channels-last
   rows (one pixel's C channels per row, 4C hidden).

   1. `gelu_with_grad`: a = GELU(h) = h * Phi(h) and d = GELU'(h) = Phi(h) + h * phi(h) in one pass. Training saves
      d instead of h: the backward of GELU is then one multiply, which the next 1x1 convolution's grad-input
      applies as a oneDNN post-op (convnext/fast/ops.py, `InvertedMlp`), so no erf is evaluated in the backward and the
      pre-activation is never read again.
   2. `mlp_forward` / `mlp_backward`: the whole MLP, forward and backward, over tiles of 96 rows that stay in cache.
      For the early stages' small C (40 channels at 32x32 for atto) the products alone are cheap and the separate
      ops are memory-bound, each writing and re-reading 4C-wide activations (a 64x32x32 batch: 42 MB per tensor);
      here the hidden tile never leaves cache: only a and d are written (for the backward, d by streaming stores),
      and the backward reads them once. The products are a register-blocked AVX-512 kernel (12 rows x 32 columns
      of accumulators, ~85% of the fp32 peak in cache). Whether this beats the separate ops is measured per stage
      shape by fast.plan_pointwise (atto's first stage: forward + backward 41 -> 30 ms; benchmarks/NOTES.md).

   erf is Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, the size of float32 rounding near 1), written so
   that erf and phi share one exp: with x = h / sqrt(2), exp(-x^2) = exp(-h^2 / 2) = sqrt(2 pi) phi(h).
   16 lanes at a time in GCC vector extensions (AVX-512 with -march=native; exp through a hand-written range
   reduction, not libm); the tiled MLP needs AVX-512 (`mlp_tiled_available`). Threads: torch's own OpenMP runtime,
   as in depthwise.c. */

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int i16 __attribute__((vector_size(64)));
#define SPLAT(x) ((v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x})

/* exp(x) for x <= 0 (here x = -h^2 / 2): 2^k * p(r), r = x - k ln 2 in [-ln2/2, ln2/2], degree-6 polynomial
   (relative error ~2e-7); below -87 it is clamped (the result, ~1e-38, is then multiplied by tiny or zero terms). */
static inline v16 exp_neg(v16 x) {
    i16 low = x < SPLAT(-87.0f);
    x = (v16)(((i16)x & ~low) | ((i16)SPLAT(-87.0f) & low));
    v16 shifter = SPLAT(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    v16 k = (x * SPLAT(1.44269504088896341f) + shifter) - shifter;
    v16 r = x - k * SPLAT(0.693145751953125f) - k * SPLAT(1.42860682030941723212e-6f);
    v16 p = SPLAT(1.0f / 720.0f);
    p = p * r + SPLAT(1.0f / 120.0f);
    p = p * r + SPLAT(1.0f / 24.0f);
    p = p * r + SPLAT(1.0f / 6.0f);
    p = p * r + SPLAT(0.5f);
    p = p * r + SPLAT(1.0f);
    p = p * r + SPLAT(1.0f);
    i16 ki = __builtin_convertvector(k, i16);
    return p * (v16)((ki + 127) << 23);
}

static inline void gelu16(v16 h, v16 *a, v16 *d) {
    i16 sign = (i16)h & (i16)SPLAT(-0.0f);
    v16 ax = (v16)((i16)h & ~sign) * SPLAT(0.70710678118654752f); /* |h| / sqrt(2) */
    v16 t = SPLAT(1.0f) / (SPLAT(1.0f) + SPLAT(0.3275911f) * ax);
    v16 e = exp_neg(SPLAT(-0.5f) * h * h);
    v16 poly = SPLAT(1.061405429f);
    poly = poly * t + SPLAT(-1.453152027f);
    poly = poly * t + SPLAT(1.421413741f);
    poly = poly * t + SPLAT(-0.284496736f);
    poly = poly * t + SPLAT(0.254829592f);
    poly = poly * t;
    v16 erf = (v16)((i16)(SPLAT(1.0f) - poly * e) | sign); /* erf(h / sqrt(2)), odd */
    v16 cdf = SPLAT(0.5f) + SPLAT(0.5f) * erf;
    /* Below h = -10, |GELU'(h)| < 1e-21 and falls to ~1e-37 by h = -13: the backward's grad x GELU'(h) is then a
       denormal, and denormals make every later product slow (a 1x1 grad-weight 2.4x: benchmarks/NOTES.md). Both
       outputs are written as 0 there (an absolute error under 1e-21). */
    i16 tiny = h < SPLAT(-10.0f);
    *a = (v16)((i16)(h * cdf) & ~tiny);
    *d = (v16)((i16)(cdf + h * e * SPLAT(0.39894228040143268f)) & ~tiny); /* phi(h) = e / sqrt(2 pi) */
}

static inline void full16(const float *h, float *a, float *d, long i) {
    v16 hv, av, dv;
    memcpy(&hv, h + i, sizeof hv);
    gelu16(hv, &av, &dv);
    memcpy(a + i, &av, sizeof av);
    memcpy(d + i, &dv, sizeof dv);
}

/* Elements from..n - 1 (fewer than 16) of h -> a, d, through zero-padded copies. */
static void tail16(const float *h, float *a, float *d, long from, long n) {
    if (from == n) return;
    float hbuf[16] = {0}, abuf[16], dbuf[16];
    memcpy(hbuf, h + from, (n - from) * sizeof(float));
    full16(hbuf, abuf, dbuf, 0);
    memcpy(a + from, abuf, (n - from) * sizeof(float));
    memcpy(d + from, dbuf, (n - from) * sizeof(float));
}

/* n float32 elements of h -> a = GELU(h), d = GELU'(h). */
void gelu_with_grad(const float *h, float *a, float *d, long n) {
    long full = n / 16 * 16;
#pragma omp parallel for schedule(static)
    for (long i = 0; i < full; i += 16) full16(h, a, d, i);
    tail16(h, a, d, full, n);
}

#ifdef __AVX512F__
#include <immintrin.h>

#define TILE 96 /* rows per tile: 96 x 4C floats stay in L2 (1.5 MB at C = 1024); 48-192 measured alike at C = 40-96 */
#define MR 12   /* rows of a micro-tile: 12 x 2 vectors (or 8 x 3) of accumulators, of the 32 registers */

int mlp_tiled_available(void) { return 1; }

/* The next tile's inputs, prefetched a few cache lines after each micro-tile, so the loads spread over the
   current tile's arithmetic (all at once, they stalled it: the backward 16.6 vs 18.5 ms at 64x32x32x40). */
struct prefetcher {
    const char *start[4];
    long lines[4], done, total, per_call, calls;
    int ranges;
};

static void prefetch_next(struct prefetcher *p, const float *const *starts, const long *floats, int ranges) {
    p->per_call = p->calls ? (p->total + p->calls - 1) / p->calls : 32; /* to finish within a tile like the last */
    p->ranges = ranges, p->done = p->total = p->calls = 0;
    for (int i = 0; i < ranges; i++) {
        p->start[i] = (const char *)starts[i];
        p->lines[i] = (floats[i] + 15) / 16;
        p->total += p->lines[i];
    }
}

static void prefetch_some(struct prefetcher *p) {
    p->calls++;
    for (long n = 0; n < p->per_call && p->done < p->total; n++, p->done++) {
        long line = p->done;
        int r = 0;
        while (line >= p->lines[r]) line -= p->lines[r++];
        __builtin_prefetch(p->start[r] + 64 * line, 0, 3);
    }
}

/* c[i, j] = (accumulate ? c : bias[j] or 0) + sum_p a[i * ars + p * acs] * b[p * ldb + j] for i < mr, j < 16 nv
   (the last vector's lanes by `last`), times mul[i * ldc + j] if mul. Inlined with constant mr and nv, so the
   accumulators stay in registers. */
static inline __attribute__((always_inline)) void micro(const int mr, const int nv, long k, const float *a, long ars,
                                                        long acs, const float *b, long ldb, float *c, long ldc,
                                                        __mmask16 last, const float *bias, int accumulate,
                                                        const float *mul) {
    __m512 acc[MR][3];
#pragma GCC unroll 12
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 3
        for (int v = 0; v < nv; v++) {
            __mmask16 m = v == nv - 1 ? last : 0xffff;
            if (accumulate)
                acc[i][v] = _mm512_maskz_loadu_ps(m, c + i * ldc + 16 * v);
            else if (bias)
                acc[i][v] = _mm512_maskz_loadu_ps(m, bias + 16 * v);
            else
                acc[i][v] = _mm512_setzero_ps();
        }
    for (long p = 0; p < k; p++) {
        __m512 bv[3];
#pragma GCC unroll 3
        for (int v = 0; v < nv; v++) bv[v] = _mm512_maskz_loadu_ps(v == nv - 1 ? last : 0xffff, b + p * ldb + 16 * v);
        const float *ap = a + p * acs;
#pragma GCC unroll 12
        for (int i = 0; i < mr; i++) {
            __m512 ai = _mm512_set1_ps(ap[i * ars]);
#pragma GCC unroll 3
            for (int v = 0; v < nv; v++) acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);
        }
    }
#pragma GCC unroll 12
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 3
        for (int v = 0; v < nv; v++) {
            __mmask16 m = v == nv - 1 ? last : 0xffff;
            __m512 r = acc[i][v];
            if (mul) r = _mm512_mul_ps(r, _mm512_maskz_loadu_ps(m, mul + i * ldc + 16 * v));
            _mm512_mask_storeu_ps(c + i * ldc + 16 * v, m, r);
        }
}

#define ROWS(nv, r)                                                                                                \
    case r:                                                                                                        \
        micro(r, nv, k, a, ars, acs, b, ldb, c, ldc, last, bias, accumulate, mul);                                 \
        break;

static void micro_any(int mr, int nv, long k, const float *a, long ars, long acs, const float *b, long ldb, float *c,
                      long ldc, __mmask16 last, const float *bias, int accumulate, const float *mul) {
    if (nv == 3) {
        switch (mr) { ROWS(3, 1) ROWS(3, 2) ROWS(3, 3) ROWS(3, 4) ROWS(3, 5) ROWS(3, 6) ROWS(3, 7) ROWS(3, 8) }
    } else if (nv == 2) {
        switch (mr) {
            ROWS(2, 1) ROWS(2, 2) ROWS(2, 3) ROWS(2, 4) ROWS(2, 5) ROWS(2, 6) ROWS(2, 7) ROWS(2, 8) ROWS(2, 9)
            ROWS(2, 10) ROWS(2, 11) ROWS(2, 12)
        }
    } else {
        switch (mr) {
            ROWS(1, 1) ROWS(1, 2) ROWS(1, 3) ROWS(1, 4) ROWS(1, 5) ROWS(1, 6) ROWS(1, 7) ROWS(1, 8) ROWS(1, 9)
            ROWS(1, 10) ROWS(1, 11) ROWS(1, 12)
        }
    }
}

/* c (m, n; row stride ldc) = [c +] a (m, k; strides ars, acs) @ b (k, n; row stride ldb) [+ bias] [* mul], one
   thread: column blocks of 32 (the last <= 48 columns in one block of up to 3 vectors), row blocks of <= 12 (8). */
static void gemm(long m, long n, long k, const float *a, long ars, long acs, const float *b, long ldb, float *c,
                 long ldc, const float *bias, int accumulate, const float *mul, struct prefetcher *pf) {
    for (long j = 0; j < n;) {
        long width = n - j <= 48 ? n - j : 32;
        int nv = (int)((width + 15) / 16), rows_max = nv == 3 ? 8 : MR;
        __mmask16 last = width % 16 ? (__mmask16)((1u << (width % 16)) - 1) : 0xffff;
        long blocks = (m + rows_max - 1) / rows_max;
        for (long q = 0, i = 0; q < blocks; q++) {
            long mr = m / blocks + (q < m % blocks); /* balanced: 40 rows as 4 x 10, not 12 + 12 + 12 + 4 */
            micro_any((int)mr, nv, k, a + i * ars, ars, acs, b + j, ldb, c + i * ldc + j, ldc, last,
                      bias ? bias + j : NULL, accumulate, mul ? mul + i * ldc + j : NULL);
            prefetch_some(pf);
            i += mr;
        }
        j += width;
    }
}

static void column_sums(const float *x, long m, long n, float *sums) { /* sums[j] += sum over i of x[i * n + j] */
    for (long j = 0; j < n; j += 16) {
        __mmask16 k = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
        __m512 s0 = _mm512_setzero_ps(), s1 = s0;
        long i = 0;
        for (; i + 2 <= m; i += 2) {
            s0 = _mm512_add_ps(s0, _mm512_maskz_loadu_ps(k, x + i * n + j));
            s1 = _mm512_add_ps(s1, _mm512_maskz_loadu_ps(k, x + (i + 1) * n + j));
        }
        if (i < m) s0 = _mm512_add_ps(s0, _mm512_maskz_loadu_ps(k, x + i * n + j));
        _mm512_mask_storeu_ps(sums + j, k, _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_maskz_loadu_ps(k, sums + j)));
    }
}

static float *transposed(const float *w, long rows, long cols) { /* (rows, cols) -> a new (cols, rows) */
    float *t = malloc(sizeof(float) * rows * cols);
    if (t)
        for (long i = 0; i < rows; i++)
            for (long j = 0; j < cols; j++) t[j * rows + i] = w[i * cols + j];
    return t;
}

static void store(float *p, v16 v, int stream) { /* streaming (past the cache) when 64-byte aligned */
    if (stream)
        _mm512_stream_ps(p, (__m512)v);
    else
        memcpy(p, &v, sizeof v);
}

/* The tile's pre-activation h (n floats) -> GELU(h) in place, and into a and GELU'(h) into d: a and d are read
   again only in the backward, so they go past the cache when aligned. */
static void gelu_tile(float *h, float *a, float *d, long n) {
    int stream = (((uintptr_t)a | (uintptr_t)d) & 63) == 0;
    long full = n / 16 * 16;
    for (long i = 0; i < full; i += 16) {
        v16 hv, av, dv;
        memcpy(&hv, h + i, sizeof hv);
        gelu16(hv, &av, &dv);
        memcpy(h + i, &av, sizeof av);
        store(a + i, av, stream);
        store(d + i, dv, stream);
    }
    tail16(h, a, d, full, n);
    memcpy(h + full, a + full, (n - full) * sizeof(float));
}

static long tile_rows(long rows, long r0) { return rows - r0 < TILE ? rows - r0 : TILE; }

/* y (rows, c), w1 (h, c), b1 (h), w2 (c, h), b2 (c), shortcut (rows, c) or NULL -> out = GELU(y w1^T + b1) w2^T
   + b2 [+ shortcut] (rows, c), and the saved a = GELU(.) and d = GELU'(.) (rows, h). Nonzero: out of memory. */
int mlp_forward(const float *y, const float *w1, const float *b1, const float *w2, const float *b2,
                const float *shortcut, float *out, float *a, float *d, long rows, long c, long h) {
    int threads = omp_get_max_threads();
    float *w1t = transposed(w1, h, c), *w2t = transposed(w2, c, h); /* (c, h) and (h, c): rows of the products */
    float *scratch = malloc(sizeof(float) * threads * TILE * h);
    if (w1t == NULL || w2t == NULL || scratch == NULL) {
        free(w1t);
        free(w2t);
        free(scratch);
        return 1;
    }
    long tiles = (rows + TILE - 1) / TILE;
#pragma omp parallel num_threads(threads)
    {
        float *ht = scratch + (size_t)omp_get_thread_num() * TILE * h; /* this thread's tile of h, then GELU(h) */
        struct prefetcher pf = {0};
#pragma omp for schedule(static)
        for (long t = 0; t < tiles; t++) {
            long r0 = t * TILE, m = tile_rows(rows, r0), r1 = r0 + m, next = r1 < rows ? tile_rows(rows, r1) : 0;
            const float *starts[2] = {y + r1 * c, shortcut ? shortcut + r1 * c : y};
            prefetch_next(&pf, starts, (long[]){next * c, shortcut ? next * c : 0}, 2);
            gemm(m, h, c, y + r0 * c, c, 1, w1t, h, ht, h, b1, 0, NULL, &pf);
            gelu_tile(ht, a + r0 * h, d + r0 * h, m * h);
            float *o = out + r0 * c;
            for (long i = 0; i < m; i++)
                for (long j = 0; j < c; j++) o[i * c + j] = b2[j] + (shortcut ? shortcut[(r0 + i) * c + j] : 0.f);
            gemm(m, c, h, ht, h, 1, w2t, c, o, c, NULL, 1, NULL, &pf);
        }
    }
    _mm_sfence(); /* the streaming stores, visible before anything reads a or d */
    free(w1t);
    free(w2t);
    free(scratch);
    return 0;
}

/* Given g = d(loss)/d(out) (rows, c) and the forward's y, w1, a, d, w2: gy (rows, c), gw1 (h, c), gb1 (h),
   gw2 (c, h), gb2 (c). The weight and bias gradients are summed per thread and added at the end (gw1 as its
   transpose, so that every product but gy's runs 4C columns wide). Nonzero: out of memory. */
int mlp_backward(const float *g, const float *y, const float *w1, const float *a, const float *d, const float *w2,
                 float *gy, float *gw1, float *gb1, float *gw2, float *gb2, long rows, long c, long h) {
    int threads = omp_get_max_threads();
    long per = 2 * c * h + h + c;
    float *partials = calloc((size_t)threads * per, sizeof(float));
    float *scratch = malloc(sizeof(float) * threads * TILE * h);
    if (partials == NULL || scratch == NULL) {
        free(partials);
        free(scratch);
        return 1;
    }
    long tiles = (rows + TILE - 1) / TILE;
#pragma omp parallel num_threads(threads)
    {
        float *pw1t = partials + (size_t)omp_get_thread_num() * per, *pw2 = pw1t + c * h, *pb1 = pw2 + c * h;
        float *pb2 = pb1 + h, *gh = scratch + (size_t)omp_get_thread_num() * TILE * h;
        struct prefetcher pf = {0};
#pragma omp for schedule(static)
        for (long t = 0; t < tiles; t++) {
            long r0 = t * TILE, m = tile_rows(rows, r0), r1 = r0 + m, next = r1 < rows ? tile_rows(rows, r1) : 0;
            const float *starts[4] = {g + r1 * c, y + r1 * c, a + r1 * h, d + r1 * h};
            prefetch_next(&pf, starts, (long[]){next * c, next * c, next * h, next * h}, 4);
            const float *gt = g + r0 * c, *yt = y + r0 * c;
            gemm(m, h, c, gt, c, 1, w2, h, gh, h, NULL, 0, d + r0 * h, &pf);   /* d(loss)/d(h) = (g w2) * d */
            gemm(c, h, m, gt, 1, c, a + r0 * h, h, pw2, h, NULL, 1, NULL, &pf); /* gw2 += g^T a */
            gemm(c, h, m, yt, 1, c, gh, h, pw1t, h, NULL, 1, NULL, &pf);        /* gw1^T += y^T gh */
            gemm(m, c, h, gh, h, 1, w1, c, gy + r0 * c, c, NULL, 0, NULL, &pf); /* gy = gh w1 */
            column_sums(gh, m, h, pb1);
            column_sums(gt, m, c, pb2);
        }
    }
    for (long j = 0; j < per; j++)
        for (int t = 1; t < threads; t++) partials[j] += partials[(size_t)t * per + j];
    for (long i = 0; i < h; i++)
        for (long j = 0; j < c; j++) gw1[i * c + j] = partials[j * h + i];
    memcpy(gw2, partials + c * h, sizeof(float) * c * h);
    memcpy(gb1, partials + 2 * c * h, sizeof(float) * h);
    memcpy(gb2, partials + 2 * c * h + h, sizeof(float) * c);
    free(partials);
    free(scratch);
    return 0;
}
#else
int mlp_tiled_available(void) { return 0; } /* no AVX-512: convnext.fast keeps the separate ops */
int mlp_forward(const float *y, const float *w1, const float *b1, const float *w2, const float *b2,
                const float *shortcut, float *out, float *a, float *d, long rows, long c, long h) {
    return -1;
}
int mlp_backward(const float *g, const float *y, const float *w1, const float *a, const float *d, const float *w2,
                 float *gy, float *gw1, float *gb1, float *gw2, float *gb2, long rows, long c, long h) {
    return -1;
}
#endif
