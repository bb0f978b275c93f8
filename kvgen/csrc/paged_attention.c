/* Paged attention on the CPU: each query attends to its own sequence's keys, read in place
 * from the block pool through the sequence's block table.
 *
 * Why C: PyTorch's CPU attention kernels take contiguous keys, so reading the pool through a
 * block table in PyTorch means copying every sequence's keys and values out first (on the
 * GPT-2-shaped serving benchmark that copy cost more than the attention itself), and compiled
 * FlexAttention's CPU template in torch 2.13 miscompiles some block-mask shapes.
 *
 * Layout (fp32, row-major):
 *   q       query token t, head h, dim d at q[t * q_token_stride + h * q_head_stride + d]
 *   k, v    one layer's pool [n_kv_heads][n_slots][head_dim]; slot s is token s % block_size
 *           of block s / block_size (the layout of PagedKVCache, layer already chosen)
 *   tables  [n_tables][table_width] block ids of each sequence
 *   token_table [n_tokens] which table row each query token reads
 *   n_keys  [n_tokens] how many keys (positions 0..n_keys-1) each query token attends to
 *   first_key [n_tokens] or NULL: the first of them it sees (a left-padded row's first real
 *           token); NULL is 0 for every token
 *   out     [n_tokens][n_heads][head_dim]
 *
 * One work item is one query token and one kv head: the heads that share that kv head (GQA)
 * are done together, so their keys come from memory once. Items are handed out one at a time
 * (dynamic schedule), because a long sequence's items take far longer than a short one's.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_HEAD_DIM 512
#define MAX_BLOCK 1024

static float dot(const float *a, const float *b, int n) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* Online softmax (Milakov and Gimelshein, 2018): a running maximum m and normalizer l, so the
 * weighted sum of values is built in one pass over the keys, block by block, with no buffer
 * as long as the sequence. */
static void attend_head(const float *q, const float *k, const float *v, const int32_t *table,
                        int first_key, int n_keys, int hd, int bs, float scale, float *out) {
    float acc[MAX_HEAD_DIM], scores[MAX_BLOCK];
    float m = -INFINITY, l = 0.0f;
    memset(acc, 0, sizeof(float) * hd);

    for (int first = first_key - first_key % bs; first < n_keys; first += bs) {
        const int64_t base = (int64_t)table[first / bs] * bs * hd;
        const float *kb = k + base, *vb = v + base;
        const int count = n_keys - first < bs ? n_keys - first : bs;
        const int from = first_key > first ? first_key - first : 0;  /* within this block */

        /* Blocks lie anywhere in the pool, each in its own page, where the hardware
         * prefetcher does not follow: ask for the next block while this one is summed. */
        if (first + bs < n_keys) {
            const int64_t next = (int64_t)table[first / bs + 1] * bs * hd;
            const int lines = bs * hd / 16; /* 64-byte lines of 16 floats */
            for (int c = 0; c < lines; c++) {
                __builtin_prefetch(k + next + c * 16);
                __builtin_prefetch(v + next + c * 16);
            }
        }

        float block_max = -INFINITY;
        for (int i = from; i < count; i++) {
            scores[i] = dot(q, kb + (int64_t)i * hd, hd) * scale;
            if (scores[i] > block_max) block_max = scores[i];
        }

        if (block_max > m) { /* rescale what was summed under the old maximum */
            const float correction = expf(m - block_max);
            l *= correction;
            for (int d = 0; d < hd; d++) acc[d] *= correction;
            m = block_max;
        }

        for (int i = from; i < count; i++) {
            const float p = expf(scores[i] - m);
            const float *vi = vb + (int64_t)i * hd;
            l += p;
            for (int d = 0; d < hd; d++) acc[d] += p * vi[d];
        }
    }

    const float inv = l > 0.0f ? 1.0f / l : 0.0f;  /* no keys: zeros, not NaN */
    for (int d = 0; d < hd; d++) out[d] = acc[d] * inv;
}

/* Returns 0, or -1 when head_dim or block_size is beyond this file's fixed buffers (the
 * caller checks those first and takes another path). */
int kvgen_paged_attention(const float *q, int64_t q_token_stride, int64_t q_head_stride,
                          const float *k, const float *v, int64_t n_slots,
                          const int32_t *tables, int table_width, const int32_t *token_table,
                          const int32_t *n_keys, const int32_t *first_key, float *out,
                          int64_t n_tokens, int n_heads,
                          int n_kv_heads, int head_dim, int block_size, float scale) {
    if (head_dim > MAX_HEAD_DIM || block_size > MAX_BLOCK) return -1;
    const int group = n_heads / n_kv_heads;
    const int64_t head_stride = n_slots * head_dim;

    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t item = 0; item < n_tokens * n_kv_heads; item++) {
        const int64_t t = item / n_kv_heads;
        const int g = (int)(item % n_kv_heads);
        const int32_t *table = tables + (int64_t)token_table[t] * table_width;
        for (int j = 0; j < group; j++) {
            const int h = g * group + j;
            attend_head(q + t * q_token_stride + h * q_head_stride, k + g * head_stride,
                        v + g * head_stride, table, first_key ? first_key[t] : 0, n_keys[t],
                        head_dim, block_size, scale, out + (t * n_heads + h) * head_dim);
        }
    }
    return 0;
}
