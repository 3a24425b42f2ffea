/* The C side of dalle_transformer.native (which says why each kernel exists), compiled at first use: a KV-cached
   decoding step's attention and sampling, the GEGLU activation with its gradient, and a transposing copy.

   Attention: for each (batch row, head), one query against the n cached keys, out = softmax(scale * K q) V.

   Plain C with OpenMP and no PyTorch headers, so it builds in a fraction of a second; its parallel loop runs on the
   OpenMP runtime PyTorch has already loaded (the loader checks). Each (row, head) streams its keys, then its values,
   once, prefetching a few rows ahead: the reads are cold in a decoding step (the layers' weights streamed through the
   caches since the last one), and the prefetches keep enough of them in flight to read at the rate a plain sum does. */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

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

/* GEGLU, x * gelu(gate) for the halves x, gate of each row of h, and its gradient: one pass over h (and the incoming
   gradient) where PyTorch's operators make three forward and five backward. gelu(g) = g Phi(g), with the normal CDF
   Phi from erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, the formula of PyTorch's own vectorized
   erf) and the exponential from Cephes' expf polynomial, written on GCC vectors of 16 floats so that each vector
   width's clone runs them in its widest registers. */

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi" /* 64-byte vectors only ever pass between inlined functions */
#endif
#define LANES 16
typedef float floats __attribute__((vector_size(4 * LANES)));
typedef int32_t ints __attribute__((vector_size(4 * LANES)));
#define INLINE static inline __attribute__((always_inline)) /* into each clone: vectors cross no call boundary */

INLINE floats broadcast(float v) { return (floats){0} + v; }
INLINE floats load(const float* p) {
  floats v;
  memcpy(&v, p, sizeof v);
  return v;
}
INLINE void store(float* p, floats v) { memcpy(p, &v, sizeof v); }

/* e^a for a <= 0, clamped at -87 (below that e^a is under the smallest normal float). */
INLINE floats exp_nonpositive(floats a) {
  ints low = a < broadcast(-87.0f);
  a = (floats)((low & (ints)broadcast(-87.0f)) | (~low & (ints)a));
  ints whole = __builtin_convertvector(a * 1.44269504088896341f - 0.5f, ints); /* a <= 0: rounds to nearest */
  floats n = __builtin_convertvector(whole, floats);
  floats r = a - n * 0.693359375f + n * 2.12194440e-4f;
  floats p = broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (floats)((whole + 127) << 23); /* times 2^whole, built in the exponent bits */
}

/* Phi(g) and the normal density phi(g), from one exponential. */
INLINE void normal_parts(floats g, floats* cdf, floats* pdf) {
  floats z = g * 0.70710678118654752f;
  ints sign = (ints)z & ((ints){0} + INT32_MIN);
  floats t = 1.0f / (1.0f + 0.3275911f * (floats)((ints)z ^ sign));
  floats e = exp_nonpositive(-z * z);
  floats poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  floats erf = (floats)((ints)(1.0f - poly * e) ^ sign);
  *cdf = 0.5f * (1.0f + erf);
  *pdf = e * 0.39894228040143268f;
}

VECTOR_CLONES
static void geglu_row(const float* x, const float* gate, float* out, int64_t width) {
  int64_t j = 0;
  for (; j + LANES <= width; j += LANES) {
    floats g = load(gate + j), cdf, pdf;
    normal_parts(g, &cdf, &pdf);
    store(out + j, load(x + j) * g * cdf);
  }
  for (; j < width; j++) out[j] = x[j] * gate[j] * 0.5f * (1.0f + erff(gate[j] * 0.70710678118654752f));
}

VECTOR_CLONES
static void geglu_backward_row(const float* x, const float* gate, const float* grad, float* grad_x, float* grad_gate,
                               int64_t width) {
  int64_t j = 0;
  for (; j + LANES <= width; j += LANES) {
    floats g = load(gate + j), d = load(grad + j), cdf, pdf;
    normal_parts(g, &cdf, &pdf);
    store(grad_x + j, d * g * cdf);
    store(grad_gate + j, d * load(x + j) * (cdf + g * pdf));
  }
  for (; j < width; j++) {
    float g = gate[j], cdf = 0.5f * (1.0f + erff(g * 0.70710678118654752f));
    grad_x[j] = grad[j] * g * cdf;
    grad_gate[j] = grad[j] * x[j] * (cdf + g * expf(-0.5f * g * g) * 0.39894228040143268f);
  }
}

/* h: contiguous [rows, 2 * width]; out: contiguous [rows, width]. */
void dalle_geglu(const float* h, float* out, int64_t rows, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; r++) geglu_row(h + r * 2 * width, h + r * 2 * width + width, out + r * width, width);
}

/* h, grad_h: contiguous [rows, 2 * width]; grad: contiguous [rows, width]. */
void dalle_geglu_backward(const float* h, const float* grad, float* grad_h, int64_t rows, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; r++) {
    const float* row = h + r * 2 * width;
    float* grad_row = grad_h + r * 2 * width;
    geglu_backward_row(row, row + width, grad + r * width, grad_row, grad_row + width, width);
  }
}

/* dst = src^T: src [rows, cols] with rows src_stride floats apart (its columns contiguous), dst contiguous
   [cols, rows]. Tiles of 32 x 32 (4 KB read, 4 KB written: both in L1), split between the threads: PyTorch's
   transposing copy runs on one thread. */
#define TILE 32
void dalle_transpose(const float* src, float* dst, int64_t rows, int64_t cols, int64_t src_stride, int threads) {
  int64_t row_tiles = (rows + TILE - 1) / TILE, col_tiles = (cols + TILE - 1) / TILE;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
  for (int64_t ct = 0; ct < col_tiles; ct++)
    for (int64_t rt = 0; rt < row_tiles; rt++) {
      int64_t r0 = rt * TILE, c0 = ct * TILE;
      int64_t r1 = r0 + TILE < rows ? r0 + TILE : rows, c1 = c0 + TILE < cols ? c0 + TILE : cols;
      for (int64_t c = c0; c < c1; c++)
        for (int64_t r = r0; r < r1; r++) dst[c * rows + r] = src[r * src_stride + c];
    }
}
