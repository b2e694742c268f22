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
typedef unsigned int u8 __attribute__((vector_size(32)));
typedef unsigned short h16 __attribute__((vector_size(32), aligned(2)));
typedef unsigned short h8 __attribute__((vector_size(16), aligned(2)));
typedef unsigned short bf16;

#define KMAX 15

/* Loads of 16, 8 or 1 channels as float32; a bfloat16 is the top half of a float32. */
static inline v16 load16_f(const float *p) { return *(const v16 *)p; }
static inline v8 load8_f(const float *p) { return *(const v8 *)p; }
static inline float load1_f(const float *p) { return *p; }
static inline v16 load16_b(const bf16 *p) { return (v16)(__builtin_convertvector(*(const h16 *)p, u16) << 16); }
static inline v8 load8_b(const bf16 *p) { return (v8)(__builtin_convertvector(*(const h8 *)p, u8) << 16); }
static inline float load1_b(const bf16 *p) {
    union { unsigned int u; float f; } v = {.u = (unsigned int)*p << 16};
    return v.f;
}

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

ROW(row16_f, float, v16, load16_f)
ROW(row8_f, float, v8, load8_f)
ROW(row1_f, float, float, load1_f)
ROW(row16_b, bf16, v16, load16_b)
ROW(row8_b, bf16, v8, load8_b)
ROW(row1_b, bf16, float, load1_b)

/* grad_w += the sum over rows r0..r1 of the flattened (b, h) index. */
#define ROWS(NAME, T, R16, R8, R1)                                                                                \
    static inline __attribute__((always_inline)) void NAME(const T *x, const T *g, float *grad_w, long r0,        \
                                                           long r1, long H, long W, long C, long k) {             \
        long p = k / 2;                                                                                           \
        for (long r = r0; r < r1; r++) {                                                                          \
            long b = r / H, h = r % H;                                                                            \
            const T *gr = g + r * W * C;                                                                          \
            for (long i = 0; i < k; i++) {                                                                        \
                if (h + i - p < 0 || h + i - p >= H) continue;                                                    \
                const T *xr = x + (b * H + h + i - p) * W * C;                                                    \
                float *out = grad_w + i * k * C;                                                                  \
                long c = 0;                                                                                       \
                for (; c + 16 <= C; c += 16) R16(xr + c, gr + c, out + c, W, C, k);                               \
                for (; c + 8 <= C; c += 8) R8(xr + c, gr + c, out + c, W, C, k);                                  \
                for (; c < C; c++) R1(xr + c, gr + c, out + c, W, C, k);                                          \
            }                                                                                                     \
        }                                                                                                         \
    }

ROWS(rows_f, float, row16_f, row8_f, row1_f)
ROWS(rows_b, bf16, row16_b, row8_b, row1_b)

/* The common kernel sizes as constants, so the k accumulators are registers and the j loops unroll. */
#define DISPATCH(ROWS_FN, T)                                                                                      \
    switch (k) {                                                                                                  \
    case 3: ROWS_FN((const T *)x, (const T *)g, part, r0, r1, H, W, C, 3); break;                                 \
    case 5: ROWS_FN((const T *)x, (const T *)g, part, r0, r1, H, W, C, 5); break;                                 \
    case 7: ROWS_FN((const T *)x, (const T *)g, part, r0, r1, H, W, C, 7); break;                                 \
    case 9: ROWS_FN((const T *)x, (const T *)g, part, r0, r1, H, W, C, 9); break;                                 \
    case 11: ROWS_FN((const T *)x, (const T *)g, part, r0, r1, H, W, C, 11); break;                               \
    default: ROWS_FN((const T *)x, (const T *)g, part, r0, r1, H, W, C, k); break;                                \
    }

/* grad_w = the sum over all B * H rows (is_bf16: x and g hold bfloat16). OpenMP threads (torch's own runtime:
   the same libgomp, the same thread count) each take a contiguous range of rows into a private buffer; the buffers
   are added at the end. Returns 0; -1 if k is even or above KMAX, or a buffer could not be allocated. */
int depthwise_weight_grad(const void *x, const void *g, float *grad_w, long B, long H, long W, long C, long k,
                          int is_bf16) {
    long R = B * H, n = k * k * C;
    int failed = 0;
    if (k % 2 == 0 || k > KMAX) return -1;
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
            if (is_bf16) {
                DISPATCH(rows_b, bf16)
            } else {
                DISPATCH(rows_f, float)
            }
#pragma omp critical
            for (long e = 0; e < n; e++) grad_w[e] += part[e];
            free(part);
        }
    }
    return failed ? -1 : 0;
}
