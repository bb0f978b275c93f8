/* y = x W^T + b for a few rows of x: the product of a decode step, where every weight is read
 * from memory once and used for only a few multiply-adds.
 *
 * Such a product is bound by how fast W streams from memory, so what matters is keeping both
 * cores reading: the output rows are split evenly over the threads, and each thread walks four
 * weight rows side by side (four independent streams for the prefetcher, four sums to hide the
 * latency of each multiply-add), with the activation rows held in cache. On this project's
 * 2-core machine PyTorch's routes read GPT-2's weights at 15-22 GB/s (MKL's gemv runs on one
 * core; oneDNN's linear does better); a plain sum() reads about 30.
 *
 * Layout (fp32, row-major): x [rows][n_in], w [n_out][n_in], bias [n_out] or NULL,
 * y [rows][n_out].
 */
#include <stdint.h>

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
    const int64_t n_quads = n_out / 4;

    #pragma omp parallel for schedule(static)
    for (int64_t quad = 0; quad < n_quads; quad++)
        four_outputs(x, rows, n_in, w, bias, y, n_out, quad * 4);

    for (int64_t o = n_quads * 4; o < n_out; o++) {  /* the last n_out % 4 outputs */
        for (int r = 0; r < rows; r++) {
            float s = 0.0f;
            for (int64_t i = 0; i < n_in; i++) s += w[o * n_in + i] * x[r * n_in + i];
            y[r * n_out + o] = s + (bias ? bias[o] : 0.0f);
        }
    }
}
