/* Exact (erf) GELU and its derivative in one pass: a = h * Phi(h) and d = Phi(h) + h * phi(h).

   Training saves d instead of h: the backward of GELU is then one multiply, which the next 1x1 convolution's
   grad-input applies as a oneDNN post-op (convnext/fast.py, `InvertedMlp`), so no erf is evaluated in the backward
   and the pre-activation is never read again.

   erf is Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, the size of float32 rounding near 1), written so
   that erf and phi share one exp: with x = h / sqrt(2), exp(-x^2) = exp(-h^2 / 2) = sqrt(2 pi) phi(h).
   The loop is branch-free so the compiler vectorises it (-O3 -march=native; exp through a hand-written
   range reduction, not libm, so it vectorises without -ffast-math). bfloat16 in and out rounds to nearest even;
   the arithmetic is float32. Threads: torch's own OpenMP runtime, as in depthwise.c. */

#include <omp.h>
#include <stdint.h>
#include <string.h>

typedef unsigned short bf16;

typedef float v16 __attribute__((vector_size(64)));
typedef int i16 __attribute__((vector_size(64)));
typedef unsigned int u16 __attribute__((vector_size(64)));
typedef unsigned short h16 __attribute__((vector_size(32)));
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
    *a = h * cdf;
    *d = cdf + h * e * SPLAT(0.39894228040143268f); /* phi(h) = e / sqrt(2 pi) */
}

static inline v16 from_bf16(h16 v) { return (v16)(__builtin_convertvector(v, u16) << 16); }

static inline h16 to_bf16(v16 f) { /* round to nearest even (the values here are finite) */
    u16 bits = (u16)f;
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return __builtin_convertvector(bits >> 16, h16);
}

static inline void full16(const void *h, void *a, void *d, long i, int is_bf16) {
    v16 av, dv;
    if (is_bf16) {
        h16 hb;
        memcpy(&hb, (const bf16 *)h + i, sizeof hb);
        gelu16(from_bf16(hb), &av, &dv);
        h16 ab = to_bf16(av), db = to_bf16(dv);
        memcpy((bf16 *)a + i, &ab, sizeof ab);
        memcpy((bf16 *)d + i, &db, sizeof db);
    } else {
        v16 hv;
        memcpy(&hv, (const float *)h + i, sizeof hv);
        gelu16(hv, &av, &dv);
        memcpy((float *)a + i, &av, sizeof av);
        memcpy((float *)d + i, &dv, sizeof dv);
    }
}

/* n elements of h (float32, or bfloat16 when is_bf16) -> a and d of the same dtype. */
void gelu_with_grad(const void *h, void *a, void *d, long n, int is_bf16) {
    long full = n / 16 * 16, size = is_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static)
    for (long i = 0; i < full; i += 16) full16(h, a, d, i, is_bf16);
    if (full < n) { /* the last n % 16 through zero-padded copies */
        char hbuf[64] = {0}, abuf[64], dbuf[64];
        memcpy(hbuf, (const char *)h + full * size, (n - full) * size);
        full16(hbuf, abuf, dbuf, 0, is_bf16);
        memcpy((char *)a + full * size, abuf, (n - full) * size);
        memcpy((char *)d + full * size, dbuf, (n - full) * size);
    }
}
