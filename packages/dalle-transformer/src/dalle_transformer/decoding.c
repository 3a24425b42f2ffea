/* Two pieces of a KV-cached decoding step, compiled at first use by dalle_transformer.native (which says why):
   its attention and its sampling.

   Attention: for each (batch row, head), one query against the n cached keys, out = softmax(scale * K q) V.

   Plain C with OpenMP and no PyTorch headers, so it builds in a fraction of a second; its parallel loop runs on the
   OpenMP runtime PyTorch has already loaded (the loader checks). Each (row, head) streams its keys, then its values,
   once, prefetching a few rows ahead: the reads are cold in a decoding step (the layers' weights streamed through the
   caches since the last one), and the prefetches keep enough of them in flight to read at the rate a plain sum does. */

#include <float.h>
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

/* Sampling one id per row of logits, as dalle_transformer.sampling does it (top-k, then temperature, then the
   exponential race of sampling.draw), in one pass instead of a dozen small operations, each slow with cold caches.

   Kept: every finite logit >= the top_k-th largest (all of them when top_k >= vocab), as filter_top_k keeps ties.
   Score of a kept logit x: exp((x - max) / temperature) / E with E = -log(max(u, FLT_MIN)), u the row's uniform
   draw for that id: the race's scores up to the softmax's common factor, so the largest wins as in sampling.draw
   (the first on a tie). -inf logits are never drawn. Returns 0, or 1 + the index of the first row holding NaN or
   +inf or only -inf (the caller reports it). */

static int64_t partition_descending(float* a, int64_t lo, int64_t hi, int64_t target) {
  /* Hoare partition of a[lo..hi] around a median of three, descending; narrows to the part holding target. */
  while (lo < hi) {
    float x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi];
    float pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
    int64_t i = lo, j = hi;
    while (i <= j) {
      while (a[i] > pivot) i++;
      while (a[j] < pivot) j--;
      if (i <= j) {
        float t = a[i];
        a[i] = a[j];
        a[j] = t;
        i++;
        j--;
      }
    }
    if (target <= j) hi = j;
    else if (target >= i) lo = i;
    else return target; /* between the two parts: equal to the pivot */
  }
  return target;
}

int64_t dalle_sample_rows(const float* logits, int64_t rows, int64_t vocab, int64_t row_stride, const float* uniform,
                          int64_t top_k, float temperature, float* scratch, int64_t* ids) {
  for (int64_t r = 0; r < rows; r++) {
    const float* x = logits + r * row_stride;
    const float* u = uniform + r * vocab;
    float largest = -INFINITY;
    for (int64_t i = 0; i < vocab; i++) {
      if (isnan(x[i]) || x[i] == INFINITY) return r + 1;
      largest = x[i] > largest ? x[i] : largest;
    }
    if (largest == -INFINITY) return r + 1;
    float threshold = -INFINITY;
    if (top_k < vocab) {
      for (int64_t i = 0; i < vocab; i++) scratch[i] = x[i];
      threshold = scratch[partition_descending(scratch, 0, vocab - 1, top_k - 1)];
    }
    float best = -1.0f;
    int64_t best_id = 0;
    for (int64_t i = 0; i < vocab; i++) {
      if (x[i] < threshold || x[i] == -INFINITY) continue;
      float e = -logf(u[i] > FLT_MIN ? u[i] : FLT_MIN);
      float score = expf((x[i] - largest) / temperature) / e;
      if (score > best) {
        best = score;
        best_id = i;
      }
    }
    ids[r] = best_id;
  }
  return 0;
}
