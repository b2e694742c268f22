/* Weight gradient of a depthwise k x k convolution (stride 1, zero padding k / 2, odd k) on channels-last tensors.

   grad_w[i][j][c] = sum over b, h, w of g[b][h][w][c] * x[b][h + i - k/2][w + j - k/2][c]   (x is 0 outside)

   x and g are (B, H, W, C), both float32 or both bfloat16 (summed in float32); grad_w is (k, k, C) float32.
   Channels are the innermost (vector) dimension: for one image row, one kernel row i and one block of 16 (or 8)
   channels, the k partial sums stay in registers while w sweeps the row.

   aten's depthwise weight gradient on CPU runs at a few GFLOP/s (benchmarks/NOTES.md); this is a plain loop nest
   the compiler vectorises with -O3 -march=native. Threads: see depthwise_weight_grad. */

#include <omp.h>
#include <stdlib.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef unsigned int u16 __attribute__((vector_size(64)));
typedef unsigned short h16 __attribute__((vector_size(32), aligned(2)));
typedef unsigned short bf16;

#define KMAX 15

/* Loads of 16, 8 or 1 channels. */
static inline v16 load16_f(const float *p) { return *(const v16 *)p; }
static inline v8 load8_f(const float *p) { return *(const v8 *)p; }
static inline float load1_f(const float *p) { return *p; }

/* out[j] += sum_w g[w] * x[w + j - p] over one image row, for one block of channels. */
#define ROW(NAME, T, VT, LOAD)                                                                                    \
    static inline __attribute__((always_inline)) void NAME(const T *xr, const T *gr, float *out, long W, long C,  \
                                                           long k) {                                              \
        long p = k / 2;                                                                                           \
        VT acc[KMAX];                                                                                             \
        for (long j = 0; j < k; j++) acc[j] = (VT){0};                                                            \
        for (long w = 0; w < W; w++) {                                                                            \
            VT gv = LOAD(gr + w * C);                                                                             \
            if (w >= p && w + p < W) { /* the whole kernel row inside the image */                                \
                for (long j = 0; j < k; j++) acc[j] += gv * LOAD(xr + (w + j - p) * C);                           \
            } else {                                                                                              \
                for (long j = 0; j < k; j++)                                                                      \
                    if (w + j - p >= 0 && w + j - p < W) acc[j] += gv * LOAD(xr + (w + j - p) * C);               \
            }                                                                                                     \
        }                                                                                                         \
        for (long j = 0; j < k; j++) *(VT *)(out + j * C) += acc[j];                                              \
    }

ROW(row16, float, v16, load16_f)
ROW(row8, float, v8, load8_f)
ROW(row1, float, float, load1_f)

/* One image row g and one input row x (each W x C) into the kernel row out (k x C). */
static inline __attribute__((always_inline)) void row(const float *xr, const float *gr, float *out, long W, long C,
                                                      long k) {
    long c = 0;
    for (; c + 16 <= C; c += 16) row16(xr + c, gr + c, out + c, W, C, k);
    for (; c + 8 <= C; c += 8) row8(xr + c, gr + c, out + c, W, C, k);
    for (; c < C; c++) row1(xr + c, gr + c, out + c, W, C, k);
}

/* A bfloat16 row to float32 (a bfloat16 is the top half of a float32). */
static void widen(const bf16 *src, float *dst, long n) {
    long e = 0;
    for (; e + 16 <= n; e += 16) *(v16 *)(dst + e) = (v16)(__builtin_convertvector(*(const h16 *)(src + e), u16) << 16);
    for (; e < n; e++) {
        union { unsigned int u; float f; } v = {.u = (unsigned int)src[e] << 16};
        dst[e] = v.f;
    }
}

/* grad_w += the sum over rows r0..r1 of the flattened (b, h) index. bfloat16 rows are widened into the per-thread
   buffers xbuf and gbuf (W x C floats each) first: each x row k times, instead of k * k times inside the loads. */
static inline __attribute__((always_inline)) void rows(const void *x, const void *g, int is_bf16, float *grad_w,
                                                       float *xbuf, float *gbuf, long r0, long r1, long H, long W,
                                                       long C, long k) {
    long p = k / 2, n = W * C;
    for (long r = r0; r < r1; r++) {
        long b = r / H, h = r % H;
        const float *gr = is_bf16 ? gbuf : (const float *)g + r * n;
        if (is_bf16) widen((const bf16 *)g + r * n, gbuf, n);
        for (long i = 0; i < k; i++) {
            if (h + i - p < 0 || h + i - p >= H) continue;
            long xrow = (b * H + h + i - p) * n;
            const float *xr = is_bf16 ? xbuf : (const float *)x + xrow;
            if (is_bf16) widen((const bf16 *)x + xrow, xbuf, n);
            row(xr, gr, grad_w + i * k * C, W, C, k);
        }
    }
}

/* The common kernel sizes as constants, so the k accumulators are registers and the j loops unroll. */
static void rows_k(const void *x, const void *g, int is_bf16, float *part, float *xbuf, float *gbuf, long r0, long r1,
                   long H, long W, long C, long k) {
    switch (k) {
    case 3: rows(x, g, is_bf16, part, xbuf, gbuf, r0, r1, H, W, C, 3); break;
    case 5: rows(x, g, is_bf16, part, xbuf, gbuf, r0, r1, H, W, C, 5); break;
    case 7: rows(x, g, is_bf16, part, xbuf, gbuf, r0, r1, H, W, C, 7); break;
    case 9: rows(x, g, is_bf16, part, xbuf, gbuf, r0, r1, H, W, C, 9); break;
    case 11: rows(x, g, is_bf16, part, xbuf, gbuf, r0, r1, H, W, C, 11); break;
    default: rows(x, g, is_bf16, part, xbuf, gbuf, r0, r1, H, W, C, k); break;
    }
}

/* grad_w = the sum over all B * H rows (is_bf16: x and g hold bfloat16). OpenMP threads (torch's own runtime:
   the same libgomp, the same thread count) each take a contiguous range of rows into their own partial sums,
   which are added in thread order after the parallel region: the same inputs and thread count give the same bits
   every time. Returns 0; -1 if k is even or above KMAX, or a buffer could not be allocated. */
int depthwise_weight_grad(const void *x, const void *g, float *grad_w, long B, long H, long W, long C, long k,
                          int is_bf16) {
    long R = B * H, n = k * k * C;
    int T = omp_get_max_threads(), used = 1, failed = 0;
    if (k % 2 == 0 || k > KMAX) return -1;
    float *parts = calloc((size_t)T * n, sizeof(float));
    if (parts == NULL) return -1;
#pragma omp parallel num_threads(T)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long r0 = R * t / nt, r1 = R * (t + 1) / nt;
        if (t == 0) used = nt;
        /* bfloat16 only: the widened x and g rows */
        float *wide = is_bf16 ? malloc(2 * W * C * sizeof(float)) : NULL;
        if (is_bf16 && wide == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
            rows_k(x, g, is_bf16, parts + (size_t)t * n, wide, wide ? wide + W * C : NULL, r0, r1, H, W, C, k);
        }
        free(wide);
    }
    for (long e = 0; e < n; e++) {
        float s = 0.0f;
        for (int t = 0; t < used; t++) s += parts[(size_t)t * n + e];
        grad_w[e] = s;
    }
    free(parts);
    return failed ? -1 : 0;
}
