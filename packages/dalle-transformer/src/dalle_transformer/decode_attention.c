/* A KV-cached decoding step's attention: for each (batch row, head), one query against the n cached keys,
   out = softmax(scale * K q) V. Compiled at first use by dalle_transformer.native, which says why it exists.

   Plain C with OpenMP and no PyTorch headers, so it builds in a fraction of a second; its parallel loop runs on the
   OpenMP runtime PyTorch has already loaded (the loader checks). Each (row, head) streams its keys, then its values,
   once, prefetching a few rows ahead: the reads are cold in a decoding step (the layers' weights streamed through the
   caches since the last one), and the prefetches keep enough of them in flight to read at the rate a plain sum does. */

#include <math.h>
#include <stdint.h>

#define CHUNK 128       /* keys scored at once, then folded into the running softmax */
#define MAX_DIM 1024    /* the largest dim_head taken (native.py checks before calling) */
#define AHEAD 8         /* rows prefetched ahead of the row read */

/* One build runs the widest vector code the CPU has (AVX-512, AVX2 + FMA, or baseline), chosen when loaded. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(DALLE_TARGET_CLONES)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

static inline void prefetch_row(const float* row, int64_t dim) {
  for (int64_t c = 0; c < dim; c += 16) __builtin_prefetch(row + c);
}

VECTOR_CLONES
static void attend_one(const float* q, const float* k, const float* v, float* out, int64_t n, int64_t dim,
                       int64_t k_row, int64_t v_row, float scale) {
  float scores[CHUNK];
  float acc[MAX_DIM];
  float best = -INFINITY, total = 0.0f;
  for (int64_t c = 0; c < dim; c++) acc[c] = 0.0f;
  for (int64_t start = 0; start < n; start += CHUNK) {
    int64_t len = n - start < CHUNK ? n - start : CHUNK;
    float chunk_best = -INFINITY;
    for (int64_t j = 0; j < len; j++) {
      const float* key = k + (start + j) * k_row;
      prefetch_row(key + AHEAD * k_row, dim);
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < dim; c++) s += q[c] * key[c];
      s *= scale;
      scores[j] = s;
      chunk_best = s > chunk_best ? s : chunk_best;
    }
    if (chunk_best > best) { /* what was summed under the old maximum, rescaled to the new one */
      float factor = expf(best - chunk_best);
      total *= factor;
      for (int64_t c = 0; c < dim; c++) acc[c] *= factor;
      best = chunk_best;
    }
    for (int64_t j = 0; j < len; j++) {
      const float* value = v + (start + j) * v_row;
      prefetch_row(value + AHEAD * v_row, dim);
      float w = expf(scores[j] - best);
      total += w;
#pragma omp simd
      for (int64_t c = 0; c < dim; c++) acc[c] += w * value[c];
    }
  }
  float inverse = 1.0f / total;
  for (int64_t c = 0; c < dim; c++) out[c] = acc[c] * inverse;
}

/* q: [batch, heads, dim], strides (q_b, q_h, 1); k, v: [batch, heads, n, dim], strides (k_b, k_h, k_row, 1) and
   (v_b, v_h, v_row, 1); out: contiguous [batch, heads, dim]. n >= 1, dim <= MAX_DIM. */
void dalle_decode_attention(const float* q, const float* k, const float* v, float* out, int64_t batch, int64_t heads,
                            int64_t n, int64_t dim, int64_t q_b, int64_t q_h, int64_t k_b, int64_t k_h,
                            int64_t k_row, int64_t v_b, int64_t v_h, int64_t v_row, float scale, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < batch * heads; i++) {
    int64_t b = i / heads, h = i % heads;
    attend_one(q + b * q_b + h * q_h, k + b * k_b + h * k_h, v + b * v_b + h * v_h, out + i * dim, n, dim, k_row,
               v_row, scale);
  }
}
