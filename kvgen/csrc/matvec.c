/* y = x W^T + b for a few rows of x: the product of a decode step, where every weight is read
 * from memory once and used for only a few multiply-adds.
 *
 * Such a product is bound by how fast W streams from memory, so what matters is keeping both
 * cores reading: the output rows are split evenly over the threads, and each thread walks its
 * share of W from start to end, one weight row at a time, with the activation rows held in
 * cache. A single forward stream per core is what the hardware prefetcher follows best: on this
 * project's 2-core machine it reads GPT-2's 768-wide weights at 33-39 GB/s, as fast as a plain
 * sum(), where walking four weight rows side by side read 22-30. When the activation rows do
 * not fit in the first-level cache beside a weight row (GPT-2's 3072-wide MLP output at two or
 * more rows), each weight row is best used for all of them while it is in registers: there the
 * four-rows-side-by-side walk wins (33 against 27 GB/s at two rows). PyTorch's own routes read
 * 15-22 GB/s (MKL's gemv runs on one core; oneDNN's linear does better).
 *
 * Layout (fp32, row-major): x [rows][n_in], w [n_out][n_in], bias [n_out] or NULL,
 * y [rows][n_out].
 */
#include <stdint.h>

/* Activation rows up to this many floats (16 KiB) stay in the first-level cache while a weight
 * row is read against each of them in turn. */
#define ONE_ROW_MAX_X_FLOATS 4096

static float dot(const float *a, const float *b, int64_t n) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static void four_outputs(const float *x, int rows, int64_t n_in, const float *w,
                         const float *bias, float *y, int64_t n_out, int64_t o) {
    const float *w0 = w + o * n_in, *w1 = w0 + n_in, *w2 = w1 + n_in, *w3 = w2 + n_in;
    for (int r = 0; r < rows; r++) {  /* rows after the first find the weights in cache */
        const float *xr = x + r * n_in;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        for (int64_t i = 0; i < n_in; i++) {
            s0 += w0[i] * xr[i];
            s1 += w1[i] * xr[i];
            s2 += w2[i] * xr[i];
            s3 += w3[i] * xr[i];
        }
        float *yr = y + r * n_out + o;
        yr[0] = s0 + (bias ? bias[o] : 0.0f);
        yr[1] = s1 + (bias ? bias[o + 1] : 0.0f);
        yr[2] = s2 + (bias ? bias[o + 2] : 0.0f);
        yr[3] = s3 + (bias ? bias[o + 3] : 0.0f);
    }
}

void kvgen_matvec(const float *x, int rows, int64_t n_in, const float *w, const float *bias,
                  float *y, int64_t n_out) {
    if ((int64_t)rows * n_in <= ONE_ROW_MAX_X_FLOATS) {
        #pragma omp parallel for schedule(static)
        for (int64_t o = 0; o < n_out; o++) {
            const float b = bias ? bias[o] : 0.0f;
            for (int r = 0; r < rows; r++)
                y[r * n_out + o] = dot(w + o * n_in, x + r * n_in, n_in) + b;
        }
        return;
    }

    const int64_t n_quads = n_out / 4;
    #pragma omp parallel for schedule(static)
    for (int64_t quad = 0; quad < n_quads; quad++)
        four_outputs(x, rows, n_in, w, bias, y, n_out, quad * 4);

    for (int64_t o = n_quads * 4; o < n_out; o++) {  /* the last n_out % 4 outputs */
        for (int r = 0; r < rows; r++)
            y[r * n_out + o] = dot(w + o * n_in, x + r * n_in, n_in) + (bias ? bias[o] : 0.0f);
    }
}
