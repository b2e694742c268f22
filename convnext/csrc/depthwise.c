/* Weight gradient of a depthwise k x k convolution (stride 1, "same" padding) on channels-last float32 tensors.

   grad_w[i][j][c] += sum over rows r in [r0, r1) of the batch-and-height index (b, h), and w in [0, W), of
                      g[b][h][w][c] * x[b][h + i][w + j][c]
   x is the input already zero-padded by k / 2 on each side: (B, H + k - 1, W + k - 1, C); g is (B, H, W, C);
   grad_w is (k, k, C). Channels are the innermost (vector) dimension; for one image row and one block of
   channels the k partial sums of a kernel row stay in registers while w sweeps the row.

   aten's depthwise weight gradient on CPU runs at a few GFLOP/s (see benchmarks/NOTES.md); this is a plain
   loop nest the compiler vectorises with -O3 -march=native. Threads: see depthwise_weight_grad. */

#include <omp.h>
#include <stdlib.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));

#define KMAX 15

#define ROW_BLOCK(NAME, VT)                                                                                        \
    static inline __attribute__((always_inline)) void NAME(const float *xr, const float *gr, float *out, long W,   \
                                                           long C, long k) {                                      \
        VT acc[KMAX];                                                                                              \
        for (long j = 0; j < k; j++) acc[j] = (VT){0};                                                             \
        for (long w = 0; w < W; w++) {                                                                             \
            VT gv = *(const VT *)(gr + w * C);                                                                     \
            for (long j = 0; j < k; j++) acc[j] += gv * *(const VT *)(xr + (w + j) * C);                           \
        }                                                                                                          \
        for (long j = 0; j < k; j++) *(VT *)(out + j * C) += acc[j];                                               \
    }

ROW_BLOCK(row16, v16)
ROW_BLOCK(row8, v8)

static inline __attribute__((always_inline)) void row1(const float *xr, const float *gr, float *out, long W, long C,
                                                       long k) {
    for (long j = 0; j < k; j++) {
        float acc = 0.0f;
        for (long w = 0; w < W; w++) acc += gr[w * C] * xr[(w + j) * C];
        out[j * C] += acc;
    }
}

static inline __attribute__((always_inline)) void rows(const float *x, const float *g, float *grad_w, long r0,
                                                       long r1, long H, long W, long C, long k) {
    long Hp = H + k - 1, Wp = W + k - 1;
    for (long r = r0; r < r1; r++) {
        long b = r / H, h = r % H;
        const float *gr = g + r * W * C;
        for (long i = 0; i < k; i++) {
            const float *xr = x + ((b * Hp + h + i) * Wp) * C;
            float *out = grad_w + i * k * C;
            long c = 0;
            for (; c + 16 <= C; c += 16) row16(xr + c, gr + c, out + c, W, C, k);
            for (; c + 8 <= C; c += 8) row8(xr + c, gr + c, out + c, W, C, k);
            for (; c < C; c++) row1(xr + c, gr + c, out + c, W, C, k);
        }
    }
}

static void rows_k(const float *x, const float *g, float *grad_w, long r0, long r1, long H, long W, long C, long k) {
    /* The common kernel sizes as constants, so the k accumulators are registers and the j loops unroll. */
    switch (k) {
    case 3: rows(x, g, grad_w, r0, r1, H, W, C, 3); break;
    case 5: rows(x, g, grad_w, r0, r1, H, W, C, 5); break;
    case 7: rows(x, g, grad_w, r0, r1, H, W, C, 7); break;
    case 9: rows(x, g, grad_w, r0, r1, H, W, C, 9); break;
    case 11: rows(x, g, grad_w, r0, r1, H, W, C, 11); break;
    default: rows(x, g, grad_w, r0, r1, H, W, C, k); break;
    }
}

/* grad_w = 0 + the sum over all B * H rows. OpenMP threads (torch's own runtime: same libgomp, same thread count)
   each take a contiguous range of rows into a private buffer; the buffers are added at the end. Returns 0, or -1
   if a buffer could not be allocated. */
int depthwise_weight_grad(const float *x, const float *g, float *grad_w, long B, long H, long W, long C, long k) {
    long R = B * H, n = k * k * C;
    int failed = 0;
    for (long e = 0; e < n; e++) grad_w[e] = 0.0f;
#pragma omp parallel
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        long r0 = R * t / T, r1 = R * (t + 1) / T;
        float *part = calloc(n, sizeof(float));
        if (part == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
            rows_k(x, g, part, r0, r1, H, W, C, k);
#pragma omp critical
            for (long e = 0; e < n; e++) grad_w[e] += part[e];
            free(part);
        }
    }
    return failed ? -1 : 0;
}
