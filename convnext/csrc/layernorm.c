/* LayerNorm over the last dimension of float32 rows (channels-last activations: a row is one pixel's C channels),
   forward and backward, for the small C of ConvNeXt's early stages.

   aten's CPU LayerNorm backward spends most of its time on the weight and bias gradients when rows are short
   (64x32x32 rows of C = 40: 6.4 ms forward + backward, against 1.8 ms here; benchmarks/NOTES.md). Here each thread
   sums its rows' weight and bias gradients into its own C-long partials, which are added at the end, and each
   row is read once per pass. Threads: torch's own OpenMP runtime, as in depthwise.c. */

#include <math.h>
#include <omp.h>
#include <stdlib.h>

/* out = (x - mean) * rstd * w + b over each of `rows` rows of c; mean and 1 / sqrt(var + eps) saved per row. */
void layer_norm_rows(const float *x, const float *w, const float *b, float *out, float *mean, float *rstd,
                     long rows, long c, float eps) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * c;
        float *o = out + r * c;
        float s = 0.f, v = 0.f;
#pragma omp simd reduction(+ : s)
        for (long j = 0; j < c; j++) s += xr[j];
        float m = s / c;
#pragma omp simd reduction(+ : v)
        for (long j = 0; j < c; j++) v += (xr[j] - m) * (xr[j] - m); /* two passes: no cancellation */
        float rs = 1.0f / sqrtf(v / c + eps);
#pragma omp simd
        for (long j = 0; j < c; j++) o[j] = (xr[j] - m) * rs * w[j] + b[j];
        mean[r] = m;
        rstd[r] = rs;
    }
}

/* Given d(loss)/d(out) g: gx = rstd * (g w - mean(g w) - xhat * mean(g w xhat)), gw = sum over rows of g xhat,
   gb = sum of g. Returns nonzero if the per-thread partials could not be allocated. */
int layer_norm_rows_backward(const float *g, const float *x, const float *mean, const float *rstd, const float *w,
                             float *gx, float *gw, float *gb, long rows, long c) {
    int threads = omp_get_max_threads();
    float *partials = calloc((size_t)threads * 2 * c, sizeof(float));
    if (partials == NULL) return 1;
#pragma omp parallel num_threads(threads)
    {
        float *pw = partials + (size_t)omp_get_thread_num() * 2 * c, *pb = pw + c;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            const float *gr = g + r * c, *xr = x + r * c;
            float *o = gx + r * c;
            float m = mean[r], rs = rstd[r], s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s1, s2)
            for (long j = 0; j < c; j++) {
                float xhat = (xr[j] - m) * rs, gw_j = gr[j] * w[j];
                s1 += gw_j;
                s2 += gw_j * xhat;
                pw[j] += gr[j] * xhat;
                pb[j] += gr[j];
            }
            s1 /= c;
            s2 /= c;
#pragma omp simd
            for (long j = 0; j < c; j++) o[j] = rs * (gr[j] * w[j] - s1 - (xr[j] - m) * rs * s2);
        }
    }
    for (long j = 0; j < c; j++) {
        float sw = 0.f, sb = 0.f;
        for (int t = 0; t < threads; t++) {
            sw += partials[(size_t)t * 2 * c + j];
            sb += partials[(size_t)t * 2 * c + c + j];
        }
        gw[j] = sw;
        gb[j] = sb;
    }
    free(partials);
    return 0;
}
