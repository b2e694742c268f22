/* Exact (erf) GELU and its derivative in one pass: a = h * Phi(h) and d = Phi(h) + h * phi(h).

   Training saves d instead of h: the backward of GELU is then one multiply, which the next 1x1 convolution's
   grad-input applies as a oneDNN post-op (convnext/fast.py, `InvertedMlp`), so no erf is evaluated in the backward
   and the pre-activation is never read again.

   erf is Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, the size of float32 rounding near 1), written so
   that erf and phi share one exp: with x = h / sqrt(2), exp(-x^2) = exp(-h^2 / 2) = sqrt(2 pi) phi(h).
   16 lanes at a time in GCC vector extensions (AVX-512 with -march=native; exp through a hand-written range
   reduction, not libm). float32 only: the fused MLP that uses it is the float32 training path. Threads: torch's
   own OpenMP runtime, as in depthwise.c. */

#include <omp.h>
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

/* n float32 elements of h -> a = GELU(h), d = GELU'(h). */
void gelu_with_grad(const float *h, float *a, float *d, long n) {
    long full = n / 16 * 16;
#pragma omp parallel for schedule(static)
    for (long i = 0; i < full; i += 16) full16(h, a, d, i);
    if (full < n) { /* the last n % 16 through zero-padded copies */
        float hbuf[16] = {0}, abuf[16], dbuf[16];
        memcpy(hbuf, h + full, (n - full) * sizeof(float));
        full16(hbuf, abuf, dbuf, 0);
        memcpy(a + full, abuf, (n - full) * sizeof(float));
        memcpy(d + full, dbuf, (n - full) * sizeof(float));
    }
}
