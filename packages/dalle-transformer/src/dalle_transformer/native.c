/* The C side of dalle_transformer.native (which says why each kernel exists), compiled at first use: a KV-cached
   decoding step's attention and sampling, the GEGLU activation with its gradient, the loss's cross-entropy with its
   gradient, a transposing copy, and causal attention over whole sequences with its gradient.

   Attention: for each (batch row, head), one query against the n cached keys, out = softmax(scale * K q) V.

   Plain C with OpenMP and no PyTorch headers, so it builds in a fraction of a second; its parallel loop runs on the
   OpenMP runtime PyTorch has already loaded (the loader checks). Each (row, head) streams its keys, then its values,
   once, prefetching a few rows ahead: the reads are cold in a decoding step (the layers' weights streamed through the
   caches since the last one), and the prefetches keep enough of them in flight to read at the rate a plain sum does. */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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

INLINE floats broadcast(float v) { return __builtin_shuffle((floats){v}, (ints){0}); }
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

INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
INLINE int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

INLINE floats larger(floats a, floats b) {
  ints a_larger = a > b;
  return (floats)((a_larger & (ints)a) | (~a_larger & (ints)b));
}

/* The sum of a vector's lanes, in lane order. */
INLINE float lanes_sum(floats lanes) {
  float sum = 0.0f;
  for (int l = 0; l < LANES; l++) sum += lanes[l];
  return sum;
}

/* The largest of row[0..last]. */
INLINE float row_max(const float* row, int64_t last) {
  floats lanes = broadcast(-INFINITY);
  int64_t j = 0;
  for (; j + LANES <= last + 1; j += LANES) lanes = larger(load(row + j), lanes);
  float best = -INFINITY;
  for (int l = 0; l < LANES; l++) best = lanes[l] > best ? lanes[l] : best;
  for (; j <= last; j++) best = row[j] > best ? row[j] : best;
  return best;
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

/* sums NULL, or [2 * width] to which the row's gradients (grad_x, then grad_gate) are added. */
VECTOR_CLONES
static void geglu_backward_row(const float* x, const float* gate, const float* grad, float* grad_x, float* grad_gate,
                               int64_t width, float* sums) {
  int64_t j = 0;
  for (; j + LANES <= width; j += LANES) {
    floats g = load(gate + j), d = load(grad + j), cdf, pdf;
    normal_parts(g, &cdf, &pdf);
    floats gx = d * g * cdf, gg = d * load(x + j) * (cdf + g * pdf);
    store(grad_x + j, gx);
    store(grad_gate + j, gg);
    if (sums) {
      store(sums + j, load(sums + j) + gx);
      store(sums + width + j, load(sums + width + j) + gg);
    }
  }
  for (; j < width; j++) {
    float g = gate[j], cdf = 0.5f * (1.0f + erff(g * 0.70710678118654752f));
    grad_x[j] = grad[j] * g * cdf;
    grad_gate[j] = grad[j] * x[j] * (cdf + g * expf(-0.5f * g * g) * 0.39894228040143268f);
    if (sums) {
      sums[j] += grad_x[j];
      sums[width + j] += grad_gate[j];
    }
  }
}

/* h: contiguous [rows, 2 * width]; out: contiguous [rows, width]. */
void dalle_geglu(const float* h, float* out, int64_t rows, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; r++) geglu_row(h + r * 2 * width, h + r * 2 * width + width, out + r * width, width);
}

/* Sums over rows of a gradient that a kernel writes row by row (a bias's, a scale's), summed while the rows are
   in the registers (a sum afterwards reads them back from memory): `threads` bands of rows, each into sums of its
   own, added in band order, so that the result does not depend on the threads' timing. row(task, r, band_sums)
   writes row r and adds its terms to band_sums ([width]). Returns 0, or 1 where the bands' sums could not be
   allocated (then nothing is computed). */
typedef void (*row_with_sums)(const void* task, int64_t r, float* sums);

static int banded_sums(const void* task, row_with_sums row, int64_t rows, float* sums, int64_t width, int threads) {
  int64_t bands = threads > 1 ? threads : 1, band_rows = (rows + bands - 1) / bands;
  float* partial = calloc(bands * width, sizeof(float));
  if (!partial) return 1;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int64_t b = 0; b < bands; b++)
    for (int64_t r = b * band_rows; r < rows && r < (b + 1) * band_rows; r++) row(task, r, partial + b * width);
  memcpy(sums, partial, width * sizeof(float));
  for (int64_t b = 1; b < bands; b++)
    for (int64_t j = 0; j < width; j++) sums[j] += partial[b * width + j];
  free(partial);
  return 0;
}

typedef struct {
  const float *h, *grad;
  float* grad_h;
  int64_t width;
} geglu_task;

static void geglu_backward_at(const void* shared, int64_t r, float* sums) {
  const geglu_task* task = shared;
  int64_t width = task->width;
  const float* row = task->h + r * 2 * width;
  float* grad_row = task->grad_h + r * 2 * width;
  geglu_backward_row(row, row + width, task->grad + r * width, grad_row, grad_row + width, width, sums);
}

/* h, grad_h: contiguous [rows, 2 * width]; grad: contiguous [rows, width]; sums NULL, or [2 * width]: the column
   sums of grad_h (the gradient of a bias added to h; banded_sums). Returns as banded_sums. */
int dalle_geglu_backward(const float* h, const float* grad, float* grad_h, float* sums, int64_t rows, int64_t width,
                         int threads) {
  geglu_task task = {h, grad, grad_h, width};
  if (sums) return banded_sums(&task, geglu_backward_at, rows, sums, 2 * width, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; r++) geglu_backward_at(&task, r, NULL);
  return 0;
}

/* A per-column scale's backward (LayerScale: out = h * scale): grad_h = grad * scale, and sums += grad * h. */
VECTOR_CLONES
static void scale_backward_row(const float* h, const float* grad, const float* scale, float* grad_h, float* sums,
                               int64_t width) {
  int64_t j = 0;
  for (; j + LANES <= width; j += LANES) {
    floats d = load(grad + j);
    store(grad_h + j, d * load(scale + j));
    store(sums + j, load(sums + j) + d * load(h + j));
  }
  for (; j < width; j++) {
    grad_h[j] = grad[j] * scale[j];
    sums[j] += grad[j] * h[j];
  }
}

typedef struct {
  const float *h, *grad, *scale;
  float* grad_h;
  int64_t width;
} scale_task;

static void scale_backward_at(const void* shared, int64_t r, float* sums) {
  const scale_task* task = shared;
  int64_t at = r * task->width;
  scale_backward_row(task->h + at, task->grad + at, task->scale, task->grad_h + at, sums, task->width);
}

/* h, grad, grad_h: contiguous [rows, width]; scale, grad_scale: [width]. grad_h = grad * scale, grad_scale = the
   column sums of grad * h (banded_sums). Returns as banded_sums. */
int dalle_scale_backward(const float* h, const float* grad, const float* scale, float* grad_h, float* grad_scale,
                         int64_t rows, int64_t width, int threads) {
  scale_task task = {h, grad, scale, grad_h, width};
  return banded_sums(&task, scale_backward_at, rows, grad_scale, width, threads);
}

/* Cross-entropy of rows of logits against target ids, a training step's loss: each row's -log softmax(x)[target]
   and, where grad is not NULL, its gradient times grad_scale, grad_scale (softmax(x) - onehot(target)), from one
   read of the row (and one write of the gradient, rescaled while it is in the caches). PyTorch's log_softmax and
   nll_loss read and write the logits' size three times forward and three times backward, keeping log-probabilities
   as large as the logits between. */
VECTOR_CLONES
static float cross_entropy_row(const float* x, int64_t vocab, int64_t target, float* grad, float grad_scale) {
  float shift = row_max(x, vocab - 1);
  floats lanes = broadcast(0.0f);
  int64_t j = 0;
  for (; j + LANES <= vocab; j += LANES) {
    floats a = load(x + j) - shift;
    floats e = (floats)((ints)exp_nonpositive(a) & ~(a < broadcast(-87.0f))); /* 0 below the clamp, as expf */
    if (grad) store(grad + j, e);
    lanes += e;
  }
  float sum = lanes_sum(lanes);
  for (; j < vocab; j++) {
    float e = expf(x[j] - shift);
    if (grad) grad[j] = e;
    sum += e;
  }
  if (grad) {
    float inverse = grad_scale / sum;
    for (j = 0; j + LANES <= vocab; j += LANES) store(grad + j, load(grad + j) * inverse);
    for (; j < vocab; j++) grad[j] *= inverse;
    grad[target] -= grad_scale;
  }
  return shift + logf(sum) - x[target];
}

/* logits [rows, vocab] (rows row_stride floats apart), targets int64[rows], losses float[rows], grad NULL or
   contiguous [rows, vocab] (times grad_scale). Returns 0, or 1 + the first row whose target is outside [0, vocab)
   (then computes nothing: PyTorch's cross-entropy says what it makes of that target). */
int64_t dalle_cross_entropy(const float* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                            const int64_t* targets, float* losses, float* grad, float grad_scale, int threads) {
  for (int64_t r = 0; r < rows; r++)
    if (targets[r] < 0 || targets[r] >= vocab) return r + 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; r++)
    losses[r] = cross_entropy_row(logits + r * row_stride, vocab, targets[r], grad ? grad + r * vocab : NULL,
                                  grad_scale);
  return 0;
}

/* Code for AVX-512 CPUs only (x86-64-v4), where a kernel needs all 32 vector registers: the causal attention's
   products and the transposing copy's blocks. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(DALLE_TARGET_CLONES)
#define HAS_WIDE 1
#define WIDE __attribute__((target("arch=x86-64-v4")))
#else
#define HAS_WIDE 0
#define WIDE
#endif

/* Whether this build and CPU run the WIDE kernels (which do nothing where not). */
int dalle_wide_kernels_run(void) {
#if HAS_WIDE
  __builtin_cpu_init(); /* idempotent; GCC asks for it where the CPU is queried early */
  return __builtin_cpu_supports("x86-64-v4") != 0;
#else
  return 0;
#endif
}

/* dst = src^T: src [rows, cols] with rows src_stride floats apart (its columns contiguous), dst contiguous
   [cols, rows], split between the threads (PyTorch's transposing copy runs on one). On AVX-512 CPUs in blocks of
   LANES x LANES transposed in registers: each source row's 64 bytes read as one vector, where a copy element by
   element reads LANES rows at once, which (for rows a multiple of 4 KB apart, as in [256, 2048]) all fall in one set
   of the L1 cache and evict each other. Elsewhere (and at the edges), tiles of 32 x 32 element by element. */
#define TILE 32
#define ARGS(...) __VA_ARGS__

/* Two-vector shuffles that swap bit `bit` of the row index with the same bit of the lane index: lanes of a and b
   (rows i and i + bit) picked by index into their concatenation. */
#define SWAP_BIT(r, bit, low, high)                                      \
  for (int i = 0; i < LANES; i++)                                        \
    if (!(i & (bit))) {                                                  \
      floats a = r[i], b = r[i + (bit)];                                 \
      r[i] = __builtin_shuffle(a, b, (ints){low});                       \
      r[i + (bit)] = __builtin_shuffle(a, b, (ints){high});              \
    }

/* r[i] = column i of the LANES x LANES block whose rows r held. */
INLINE void transpose_registers(floats* r) {
  SWAP_BIT(r, 8, ARGS(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
           ARGS(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
  SWAP_BIT(r, 4, ARGS(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
           ARGS(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
  SWAP_BIT(r, 2, ARGS(0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
           ARGS(2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
  SWAP_BIT(r, 1, ARGS(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
           ARGS(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
}

WIDE static void transpose_block(float* restrict dst, int64_t dst_row, const float* restrict src, int64_t src_row) {
  floats r[LANES];
#pragma GCC unroll 16
  for (int i = 0; i < LANES; i++) r[i] = load(src + i * src_row);
  transpose_registers(r);
#pragma GCC unroll 16
  for (int i = 0; i < LANES; i++) store(dst + i * dst_row, r[i]);
}

static void transpose_tile(const float* src, float* dst, int64_t rows, int64_t src_stride, int64_t r0, int64_t r1,
                           int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; c++)
    for (int64_t r = r0; r < r1; r++) dst[c * rows + r] = src[r * src_stride + c];
}

void dalle_transpose(const float* src, float* dst, int64_t rows, int64_t cols, int64_t src_stride, int threads) {
  if (dalle_wide_kernels_run()) {
    int64_t row_blocks = rows / LANES, col_blocks = cols / LANES, blocked_rows = row_blocks * LANES;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) collapse(2) nowait
      for (int64_t cb = 0; cb < col_blocks; cb++)
        for (int64_t rb = 0; rb < row_blocks; rb++)
          transpose_block(dst + cb * LANES * rows + rb * LANES, rows, src + rb * LANES * src_stride + cb * LANES,
                          src_stride);
#pragma omp for schedule(static)
      for (int64_t c = 0; c < cols; c++) /* the rows past the blocks, and the columns past them */
        transpose_tile(src, dst, rows, src_stride, c < col_blocks * LANES ? blocked_rows : 0, rows, c, c + 1);
    }
    return;
  }
  int64_t row_tiles = (rows + TILE - 1) / TILE, col_tiles = (cols + TILE - 1) / TILE;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
  for (int64_t ct = 0; ct < col_tiles; ct++)
    for (int64_t rt = 0; rt < row_tiles; rt++)
      transpose_tile(src, dst, rows, src_stride, rt * TILE, smaller(rt * TILE + TILE, rows), ct * TILE,
                     smaller(ct * TILE + TILE, cols));
}

/* Products of a few rows (a KV-cached decoding step's: one position of each sequence) with a weight that streams
   from memory once per step, as the layers' weights do there (each was read a whole step ago: none is in the
   caches). The weight is copied, once per sequence, into blocks of STREAM_COLS output features ([blocks, in,
   STREAM_COLS], zeros past the last feature), so that each block is one contiguous read; each thread takes a run of
   blocks, and each block's products (4 rows at a time, 4 vectors of results each, in registers) read it from the
   caches after the first group of rows. */
#define STREAM_COLS (4 * LANES)
#define STREAM_ROWS 4

INLINE void stream_group(float* y, int64_t y_row, const float* x, int64_t x_row, const float* block, int64_t in,
                         const float* bias, int64_t cols, int rows) {
  floats acc[STREAM_ROWS][4];
#pragma GCC unroll 4
  for (int r = 0; r < STREAM_ROWS; r++) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = broadcast(0.0f);
  for (int64_t i = 0; i < in; i++) {
    const float* w = block + i * STREAM_COLS;
    floats w0 = load(w), w1 = load(w + LANES), w2 = load(w + 2 * LANES), w3 = load(w + 3 * LANES);
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) {
      floats xv = broadcast(x[r * x_row + i]);
      acc[r][0] += xv * w0;
      acc[r][1] += xv * w1;
      acc[r][2] += xv * w2;
      acc[r][3] += xv * w3;
    }
  }
  for (int r = 0; r < rows; r++) {
    float* row = y + r * y_row;
    if (cols == STREAM_COLS) {
      for (int k = 0; k < 4; k++) store(row + k * LANES, bias ? acc[r][k] + load(bias + k * LANES) : acc[r][k]);
    } else { /* the last block's features past out are not stored */
      float sums[STREAM_COLS];
      for (int k = 0; k < 4; k++) store(sums + k * LANES, acc[r][k]);
      for (int64_t j = 0; j < cols; j++) row[j] = sums[j] + (bias ? bias[j] : 0.0f);
    }
  }
}

/* y[r, b STREAM_COLS + j] = x[r] . block b's column j (+ bias), for the rows of x and the cols (<= STREAM_COLS)
   output features of block b. */
WIDE static void stream_block(float* y, int64_t y_row, const float* x, int64_t x_row, int64_t rows,
                              const float* block, int64_t in, const float* bias, int64_t cols) {
  for (int64_t r = 0; r < rows; r += STREAM_ROWS) {
    const float* xr = x + r * x_row;
    float* yr = y + r * y_row;
    switch (smaller(rows - r, STREAM_ROWS)) { /* the number of rows a constant in each copy of the loop */
      case 1: stream_group(yr, y_row, xr, x_row, block, in, bias, cols, 1); break;
      case 2: stream_group(yr, y_row, xr, x_row, block, in, bias, cols, 2); break;
      case 3: stream_group(yr, y_row, xr, x_row, block, in, bias, cols, 3); break;
      default: stream_group(yr, y_row, xr, x_row, block, in, bias, cols, 4); break;
    }
  }
}

/* y [rows, out] (rows y_row floats apart) = x [rows, in] (rows x_row apart) times the weight in blocks (see above),
   plus bias (NULL for none). Does nothing and returns 1 where the CPU does not run the AVX-512 kernels. */
int dalle_stream_product(const float* x, int64_t rows, int64_t x_row, const float* blocks, int64_t in, int64_t out,
                         const float* bias, float* y, int64_t y_row, int threads) {
  if (!dalle_wide_kernels_run()) return 1;
  int64_t count = (out + STREAM_COLS - 1) / STREAM_COLS;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < count; b++)
    stream_block(y + b * STREAM_COLS, y_row, x, x_row, rows, blocks + b * in * STREAM_COLS, in,
                 bias ? bias + b * STREAM_COLS : NULL, smaller(out - b * STREAM_COLS, STREAM_COLS));
  return 0;
}

/* Causal self-attention over whole sequences (training, and the first pass of decoding), forward and backward, for
   each (batch row, head): out = softmax(scale * Q K^T + causal mask) V. The forward keeps the log of each query's
   softmax sum, from which the backward recomputes the probabilities (as flash attention does: nothing n x n is kept
   between them).

   SDPA's CPU kernel multiplies these small blocks through a BLAS that runs AVX2 code on AMD processors, at a small
   fraction of the machine's rate. Here every product is one register-blocked kernel (ROWS rows of two 16-float
   vectors of the result in registers; per step, broadcasts of the left factor times a row of the right one) on
   copies of the head's tensors padded with zeros to whole vectors, in blocks of BLOCK queries whose scores stay in
   the caches, skipping scores above the diagonal 32 keys at a time. Built for AVX-512 CPUs only (x86-64-v4): with
   half as many registers, each two per vector, AVX2 code spills the block and runs no faster than SDPA. (ROWS 8
   measured within this machine's noise of 6, faster in one run and slower in the next; 12 spills.) */

#define ROWS 6
#define COLS (2 * LANES)
#define BLOCK 64
enum { LIMIT_NONE, LIMIT_COLS, LIMIT_DEPTH, LIMIT_DEPTH_FROM };


/* c[i][j] (=, or += with accumulate) sum_t x[i * x_row + t * x_step] * y[t * y_row + j] over start <= t < depth,
   for `rows` (at most ROWS) rows i and the COLS columns j at c, y. */
INLINE void micro_product(float* c, int64_t c_row, const float* x, int64_t x_row, int64_t x_step, const float* y,
                          int64_t y_row, int64_t start, int64_t depth, int64_t rows, int accumulate) {
  floats acc[ROWS][2];
  const float* x_rows[ROWS];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; r++) {
    x_rows[r] = x + (r < rows ? r : rows - 1) * x_row; /* missing rows repeat the last one, never stored */
    acc[r][0] = acc[r][1] = broadcast(0.0f);
  }
  for (int64_t t = start; t < depth; t++) {
    floats y0 = load(y + t * y_row), y1 = load(y + t * y_row + LANES);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; r++) {
      floats xv = broadcast(x_rows[r][t * x_step]);
      acc[r][0] += xv * y0;
      acc[r][1] += xv * y1;
    }
  }
  for (int r = 0; r < rows; r++) {
    float* row = c + r * c_row;
    if (accumulate) {
      acc[r][0] += load(row);
      acc[r][1] += load(row + LANES);
    }
    store(row, acc[r][0]);
    store(row + LANES, acc[r][1]);
  }
}

/* c = x y (or c += x y) for x [rows, depth] (element (i, t) at x[i * x_row + t * x_step]), y [depth, cols] (rows
   y_row apart), c [rows, cols] (rows c_row apart); cols a multiple of COLS. Row i is query first + i of a causal
   attention: with LIMIT_COLS its columns stop at the first multiple of COLS past its group of rows' last query
   (the rest left as they were), with LIMIT_DEPTH its sum stops after that query. With LIMIT_DEPTH_FROM row i is
   key i and the sum's index t query first + t: its sum starts at its group's first key's query (x^T y of a
   backward, whose earlier queries' probabilities for that key are 0). */
INLINE void product(float* c, int64_t c_row, const float* x, int64_t x_row, int64_t x_step, const float* y,
                    int64_t y_row, int64_t rows, int64_t cols, int64_t depth, int64_t first, int limit,
                    int accumulate) {
  for (int64_t i = 0; i < rows; i += ROWS) {
    int64_t here = smaller(rows - i, ROWS), end = first + i + here;
    int64_t group_cols = limit == LIMIT_COLS ? smaller(cols, round_up(end, COLS)) : cols;
    int64_t group_depth = limit == LIMIT_DEPTH ? smaller(depth, end) : depth;
    int64_t start = limit == LIMIT_DEPTH_FROM && i > first ? smaller(i - first, depth) : 0;
    for (int64_t j = 0; j < group_cols; j += COLS)
      micro_product(c + i * c_row + j, c_row, x + i * x_row, x_row, x_step, y + j, y_row, start, group_depth, here,
                    accumulate);
  }
}

/* row[j] = exp(row[j] - shift) for j <= last (all <= 0 after the shift), 0 for last < j < width (a multiple of
   LANES, past last); returns the sum. The last, partial vector too is one exponential of LANES lanes, those past
   `last` (whatever the row held there) set to 0: expf element by element at the rows' ends made a small model's
   attention (96 positions) 1.06-1.15x slower. */
INLINE float exp_shifted(float* row, int64_t last, int64_t width, float shift) {
  int64_t j = 0;
  floats lanes = broadcast(0.0f);
  for (; j + LANES <= last + 1; j += LANES) {
    floats e = exp_nonpositive(load(row + j) - shift);
    store(row + j, e);
    lanes += e;
  }
  if (j <= last) {
    ints inside = (ints){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} < (ints){0} + (int32_t)(last + 1 - j);
    floats e = (floats)((ints)exp_nonpositive(load(row + j) - shift) & inside);
    store(row + j, e);
    lanes += e;
    j += LANES;
  }
  for (; j < width; j++) row[j] = 0.0f;
  return lanes_sum(lanes);
}

/* Dropout of the probabilities without a stored mask: probability (i, j) of a head is kept when a hash of its
   index, base + j with base = hash(seed, head) + i n (unique while n < 65536), is at least threshold = p 2^32,
   and then scaled by 1 / (1 - p); the backward hashes the same indices, so it drops the same probabilities. */
typedef uint32_t uints __attribute__((vector_size(4 * LANES)));

#define MIX32(x)        \
  do {                  \
    x ^= x >> 16;       \
    x *= 0x7feb352dU;   \
    x ^= x >> 15;       \
    x *= 0x846ca68bU;   \
    x ^= x >> 16;       \
  } while (0)

INLINE uint32_t mix32(uint32_t x) {
  MIX32(x);
  return x;
}

/* The factors (1 / (1 - p) or 0) of the LANES probabilities at columns j.. of the row whose hashes start at base. */
INLINE floats kept_lanes(uint32_t base, int64_t j, uint32_t threshold, float scale) {
  uints x = (uints){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} + (base + (uint32_t)j);
  MIX32(x);
  ints kept = (ints)(x >= threshold);
  return (floats)(kept & (ints)broadcast(scale));
}

INLINE float kept(uint32_t base, int64_t j, uint32_t threshold, float scale) {
  return mix32(base + (uint32_t)j) >= threshold ? scale : 0.0f;
}

/* to[0..dim) = from[0..dim) times scale, zeros from there to padded: whole vectors, then element by element. The
   scale is hidden from the compiler, which turned a copy with a scale of 1 into a call of memcpy per row (a row
   of dim_head floats: the calls took 6% of the S benchmark config's attention, and the per-row memset of no
   padding 2%). */
INLINE void scaled_row(float* restrict to, const float* restrict from, int64_t dim, int64_t padded, float scale) {
  volatile float hidden = scale;
  floats factor = broadcast(hidden);
  int64_t c = 0;
  for (; c + LANES <= dim; c += LANES) store(to + c, load(from + c) * factor);
  for (; c < dim; c++) to[c] = from[c] * factor[0];
  for (; c < padded; c++) to[c] = 0.0f;
}

/* dst [rows_padded, dim_padded] = src [rows, dim] (rows src_row apart) times scale, zeros in the padding. These
   copies are AVX-512 code as the kernels calling them are (compiled for the baseline CPU, with the element-by-element
   transposes below, the attention forward + backward was 1.03-1.24x slower). A head's rows are a position's q, k
   and v apart (3 x heads x dim_head floats), and the copies waited on each one's cache misses: prefetched AHEAD
   rows ahead, the S benchmark config's attention took 1.08-1.10x less time inside its training step. */
WIDE static void copy_padded(float* restrict dst, const float* restrict src, int64_t src_row, int64_t rows,
                             int64_t dim, int64_t rows_padded, int64_t dim_padded, float scale) {
  for (int64_t i = 0; i < rows; i++) {
    const float* from = src + i * src_row;
    if (i + AHEAD < rows) prefetch_row(from + AHEAD * src_row, dim);
    scaled_row(dst + i * dim_padded, from, dim, dim_padded, scale);
  }
  memset(dst + rows * dim_padded, 0, (rows_padded - rows) * dim_padded * sizeof(float));
}

/* Columns 0..count (count <= LANES) of dst (rows dst_row floats apart) = the rows `from` ([count], dim floats
   each) transposed: LANES x LANES blocks in registers (each row read as vectors, where reading element by element
   reads LANES rows at once), the columns past the last block element by element. */
INLINE void transpose_rows(float* dst, int64_t dst_row, const float* const* from, int64_t count, int64_t dim) {
  int64_t c = 0;
  for (; c + LANES <= dim; c += LANES) {
    floats r[LANES];
#pragma GCC unroll 16
    for (int i = 0; i < LANES; i++) r[i] = i < count ? load(from[i] + c) : broadcast(0.0f);
    transpose_registers(r);
#pragma GCC unroll 16
    for (int i = 0; i < LANES; i++)
      if (count == LANES) /* one vector store, where a copy of a variable length is a call into the C library */
        store(dst + (c + i) * dst_row, r[i]);
      else
        memcpy(dst + (c + i) * dst_row, &r[i], count * sizeof(float));
  }
  for (; c < dim; c++)
    for (int64_t i = 0; i < count; i++) dst[c * dst_row + i] = from[i][c];
}

/* dst [dim_padded, rows_padded] = src [rows, dim]^T, zeros in the padding. */
WIDE static void copy_transposed(float* restrict dst, const float* restrict src, int64_t src_row, int64_t rows,
                                 int64_t dim, int64_t rows_padded, int64_t dim_padded) {
  memset(dst + dim * rows_padded, 0, (dim_padded - dim) * rows_padded * sizeof(float));
  for (int64_t i = 0; i < rows; i += LANES) {
    const float* from[LANES];
    int64_t here = smaller(LANES, rows - i);
    for (int64_t r = 0; r < here; r++) from[r] = src + (i + r) * src_row;
    for (int64_t r = i + LANES; r < smaller(rows, i + 2 * LANES); r++) prefetch_row(src + r * src_row, dim);
    transpose_rows(dst + i, rows_padded, from, here, dim);
  }
  if (rows < rows_padded)
    for (int64_t c = 0; c < dim; c++) memset(dst + c * rows_padded + rows, 0, (rows_padded - rows) * sizeof(float));
}

/* dst [rows, dim] (rows dst_row apart) = src [rows, dim_padded] times scale. */
WIDE static void copy_unpadded(float* restrict dst, int64_t dst_row, const float* restrict src, int64_t rows,
                               int64_t dim, int64_t dim_padded, float scale) {
  for (int64_t i = 0; i < rows; i++) scaled_row(dst + i * dst_row, src + i * dim_padded, dim, dim, scale);
}

/* sum_c a[c] b[c], LANES products at a time. */
INLINE float dot(const float* a, const float* b, int64_t dim) {
  floats lanes = broadcast(0.0f);
  int64_t c = 0;
  for (; c + LANES <= dim; c += LANES) lanes += load(a + c) * load(b + c);
  float sum = lanes_sum(lanes);
  for (; c < dim; c++) sum += a[c] * b[c];
  return sum;
}

/* The image queries' groups of a non-causal pattern (dalle_transformer.plans.kernel_groups): group g's queries are
   the positions queries[query_start[g] .. query_start[g + 1]), its gathered image keys the positions
   keys[key_start[g] .. key_start[g + 1]), and allowed[mask_start[g] ..] says, row by row, which of those keys each
   query may attend to (1) or not (0). Every query also attends to the text_len text positions. */
typedef struct {
  int64_t text_len, count, max_queries, max_keys;
  const int64_t *query_start, *queries, *key_start, *keys, *mask_start;
  const uint8_t* allowed;
} group_plan;

/* A (batch row, head)'s tensors, each [n, dim] with rows the given number of floats apart; lse [n]. */
typedef struct {
  const float *q, *k, *v;
  int64_t qkv_row;
  float* out; /* the backward reads out and grad, rows out_row apart, and writes grad_q, grad_k, grad_v */
  const float* grad;
  int64_t out_row;
  float *lse, *grad_q, *grad_k, *grad_v;
  int64_t grad_qkv_row, n, dim;
  float scale;
  float* scratch;
  uint32_t dropped_below, head_hash; /* dropout: p 2^32 (0 for none), and hash(seed, head) */
  float kept_scale;                  /* 1 / (1 - p) */
  const group_plan* groups;          /* NULL: causal attention */
} head_task;

static int64_t forward_scratch(int64_t n, int64_t dim) {
  int64_t dp = round_up(dim, COLS), np = round_up(n, COLS);
  return n * dp + 2 * np * dp + BLOCK * np + BLOCK * dp;
}

static int64_t backward_scratch(int64_t n, int64_t dim) {
  int64_t dp = round_up(dim, COLS), np = round_up(n, COLS);
  return 2 * n * dp + 5 * np * dp + 2 * BLOCK * np + BLOCK * dp + n;
}

/* Scores row[0..last] of the query at position `query` made its probabilities (dropped as the task says), zeros
   up to width; returns the log of its softmax sum. */
INLINE float softmax_row(const head_task* task, float* row, int64_t last, int64_t width, int64_t query) {
  float best = row_max(row, last);
  float sum = exp_shifted(row, last, width, best), inverse = 1.0f / sum;
  for (int64_t j = 0; j <= last; j++) row[j] *= inverse;
  if (task->dropped_below) {
    uint32_t base = task->head_hash + (uint32_t)(query * task->n);
    for (int64_t j = 0; j < width; j += LANES)
      store(row + j, load(row + j) * kept_lanes(base, j, task->dropped_below, task->kept_scale));
  }
  return best + logf(sum);
}

/* With p[0..last] the recomputed probabilities of the query at `query` and g its dP = grad V^T: g = dS, the
   softmax's gradient P * (dP - delta) (dropout: dP times the kept factors, and p made the dropped probabilities,
   which grad_v's product takes); zeros in g up to width. */
INLINE void softmax_gradient_row(const head_task* task, float* p, float* g, int64_t last, int64_t width,
                                 int64_t query, float delta) {
  int64_t j = 0;
  floats d = broadcast(delta);
  if (task->dropped_below) {
    uint32_t base = task->head_hash + (uint32_t)(query * task->n), below = task->dropped_below;
    float kept_scale = task->kept_scale;
    for (; j + LANES <= last + 1; j += LANES) {
      floats factors = kept_lanes(base, j, below, kept_scale), pj = load(p + j);
      store(g + j, pj * (load(g + j) * factors - d));
      store(p + j, pj * factors);
    }
    for (; j <= last; j++) {
      float factor = kept(base, j, below, kept_scale);
      g[j] = p[j] * (g[j] * factor - delta);
      p[j] *= factor;
    }
  } else {
    for (; j + LANES <= last + 1; j += LANES) store(g + j, load(p + j) * (load(g + j) - d));
    for (; j <= last; j++) g[j] = p[j] * (g[j] - delta);
  }
  for (; j < width; j++) g[j] = 0.0f;
}

/* Causal attention of the first `count` queries (qs [count, dp], scaled) over keys kt (transposed, [dp, >= count]
   with rows `row` floats apart) and values vp ([>= count, dp]); scores [BLOCK, row], o [BLOCK, dp]. Writes their
   out and lse. */
WIDE static void causal_forward_rows(const head_task* task, const float* qs, const float* kt, const float* vp,
                                     int64_t row, float* scores, float* o, int64_t count) {
  int64_t dim = task->dim, dp = round_up(dim, COLS);
  for (int64_t first = 0; first < count; first += BLOCK) {
    int64_t rows = smaller(BLOCK, count - first), width = round_up(first + rows, COLS);
    product(scores, row, qs + first * dp, dp, 1, kt, row, rows, width, dp, first, LIMIT_COLS, 0);
    for (int64_t r = 0; r < rows; r++)
      task->lse[first + r] = softmax_row(task, scores + r * row, first + r, width, first + r);
    product(o, dp, scores, row, 1, vp, dp, rows, dp, width, first, LIMIT_DEPTH, 0);
    copy_unpadded(task->out + first * task->out_row, task->out_row, o, rows, dim, dp, 1.0f);
  }
}

/* With P the probabilities and dP = grad V^T: dS = P * (dP - rowsum(grad * out)) (the softmax's gradient),
   grad_v = P^T grad, grad_k = dS^T (scale q), grad_q = scale dS K. This for the first `count` queries of a causal
   attention (qs and gp [count, dp]: scaled q and grad) over keys kt (transposed, rows `row` floats apart), kp
   ([>= count, dp]) and values vt (transposed, rows `row` apart): adds their terms to gk and gv ([round_up(count,
   COLS), dp] at least) and writes their grad_q. probs and gs [BLOCK, row], gq [BLOCK, dp], delta [count]. */
WIDE static void causal_backward_rows(const head_task* task, const float* qs, const float* gp, const float* kt,
                                      const float* kp, const float* vt, int64_t row, float* gk, float* gv,
                                      float* probs, float* gs, float* gq, const float* delta, int64_t count) {
  int64_t dim = task->dim, dp = round_up(dim, COLS);
  for (int64_t first = 0; first < count; first += BLOCK) {
    int64_t rows = smaller(BLOCK, count - first), width = round_up(first + rows, COLS);
    product(probs, row, qs + first * dp, dp, 1, kt, row, rows, width, dp, first, LIMIT_COLS, 0);
    product(gs, row, gp + first * dp, dp, 1, vt, row, rows, width, dp, first, LIMIT_COLS, 0);
    for (int64_t r = 0; r < rows; r++) {
      int64_t last = first + r;
      float *p = probs + r * row, *g = gs + r * row;
      exp_shifted(p, last, width, task->lse[last]);
      softmax_gradient_row(task, p, g, last, width, last, delta[last]);
    }
    product(gv, dp, probs, 1, row, gp + first * dp, dp, width, dp, rows, first, LIMIT_DEPTH_FROM, 1);
    product(gk, dp, gs, 1, row, qs + first * dp, dp, width, dp, rows, first, LIMIT_DEPTH_FROM, 1);
    product(gq, dp, gs, row, 1, kp, dp, rows, dp, width, first, LIMIT_DEPTH, 0);
    copy_unpadded(task->grad_q + first * task->grad_qkv_row, task->grad_qkv_row, gq, rows, dim, dp, task->scale);
  }
}

/* A backward's copies: qs and gp [n, dp] (scaled q, grad), the first `keys` keys transposed into kt and values
   into vt ([dp, width]) and keys into kp ([width, dp]); gk and gv (adjacent, `rows` rows each) zeroed; delta[i] =
   rowsum(grad * out) of the head's n queries. */
WIDE static void backward_inputs(const head_task* task, float* qs, float* gp, float* kt, float* kp, float* vt,
                                 int64_t keys, int64_t width, float* gk, int64_t rows, float* delta) {
  int64_t n = task->n, dim = task->dim, dp = round_up(dim, COLS);
  copy_padded(qs, task->q, task->qkv_row, n, dim, n, dp, task->scale);
  copy_padded(gp, task->grad, task->out_row, n, dim, n, dp, 1.0f);
  copy_transposed(kt, task->k, task->qkv_row, keys, dim, width, dp);
  copy_padded(kp, task->k, task->qkv_row, keys, dim, width, dp, 1.0f);
  copy_transposed(vt, task->v, task->qkv_row, keys, dim, width, dp);
  memset(gk, 0, 2 * rows * dp * sizeof(float)); /* gk and gv */
  for (int64_t i = 0; i < n; i++) {
    if (i + AHEAD < n) {
      prefetch_row(task->grad + (i + AHEAD) * task->out_row, dim);
      prefetch_row(task->out + (i + AHEAD) * task->out_row, dim);
    }
    delta[i] = dot(task->grad + i * task->out_row, task->out + i * task->out_row, dim);
  }
}

/* A forward's copies: qs [n, dp] (scaled q), the first `keys` keys transposed into kt ([dp, width]) and values
   into vp ([width, dp]). */
WIDE static void forward_inputs(const head_task* task, float* qs, float* kt, float* vp, int64_t keys, int64_t width) {
  int64_t n = task->n, dim = task->dim, dp = round_up(dim, COLS);
  copy_padded(qs, task->q, task->qkv_row, n, dim, n, dp, task->scale);
  copy_transposed(kt, task->k, task->qkv_row, keys, dim, width, dp);
  copy_padded(vp, task->v, task->qkv_row, keys, dim, width, dp, 1.0f);
}

WIDE static void forward_head(const head_task* task) {
  int64_t n = task->n, dim = task->dim, dp = round_up(dim, COLS), np = round_up(n, COLS);
  float *qs = task->scratch, *kt = qs + n * dp, *vp = kt + dp * np, *scores = vp + np * dp, *o = scores + BLOCK * np;
  forward_inputs(task, qs, kt, vp, n, np);
  causal_forward_rows(task, qs, kt, vp, np, scores, o, n);
}

WIDE static void backward_head(const head_task* task) {
  int64_t n = task->n, dim = task->dim, dp = round_up(dim, COLS), np = round_up(n, COLS);
  float *qs = task->scratch, *gp = qs + n * dp, *kt = gp + n * dp, *kp = kt + dp * np, *vt = kp + np * dp;
  float *gk = vt + dp * np, *gv = gk + np * dp, *probs = gv + np * dp, *gs = probs + BLOCK * np;
  float *gq = gs + BLOCK * np, *delta = gq + BLOCK * dp;
  backward_inputs(task, qs, gp, kt, kp, vt, n, np, gk, np, delta);
  causal_backward_rows(task, qs, gp, kt, kp, vt, np, gk, gv, probs, gs, gq, delta, n);
  copy_unpadded(task->grad_k, task->grad_qkv_row, gk, n, dim, dp, 1.0f);
  copy_unpadded(task->grad_v, task->grad_qkv_row, gv, n, dim, dp, 1.0f);
}

/* Grouped attention (the axial, conv-like and sparse patterns): the text queries attend causally, as above, to the
   text keys, which every image query attends to as well; the image queries, a group at a time, to those text keys
   and their group's gathered image keys, masked by the group's rows of `allowed`. A group's keys are columns
   text_len.. of the head's key (and value) copies, whose first text_len columns hold the text keys throughout; so
   a group scores about (text_len + its keys) per query where causal attention scores every earlier position.
   The widths below: `wide` the widest row of keys, `tall` the most query rows at once. */
INLINE int64_t group_wide(const group_plan* plan) { return round_up(plan->text_len + plan->max_keys, COLS); }
INLINE int64_t group_tall(const group_plan* plan) { return plan->max_queries > BLOCK ? plan->max_queries : BLOCK; }
INLINE int64_t group_keys_rows(int64_t n, const group_plan* plan) {
  int64_t np = round_up(n, COLS), wide = group_wide(plan);
  return np > wide ? np : wide;
}

static int64_t grouped_forward_scratch(int64_t n, int64_t dim, const group_plan* plan) {
  int64_t dp = round_up(dim, COLS), wide = group_wide(plan), tall = group_tall(plan);
  return n * dp + 2 * wide * dp + tall * wide + tall * dp + plan->max_queries * dp;
}

static int64_t grouped_backward_scratch(int64_t n, int64_t dim, const group_plan* plan) {
  int64_t dp = round_up(dim, COLS), wide = group_wide(plan), tall = group_tall(plan);
  return 2 * n * dp + 4 * wide * dp + 2 * group_keys_rows(n, plan) * dp + 2 * tall * wide + tall * dp +
         2 * plan->max_queries * dp + n;
}

/* Columns at..at + count of kt (transposed keys, rows `row` floats apart) = the rows positions[..] of src. */
WIDE static void gather_columns(float* kt, int64_t row, int64_t at, const float* src, int64_t src_row,
                                const int64_t* positions, int64_t count, int64_t dim) {
  for (int64_t m = 0; m < count; m += LANES) {
    const float* from[LANES];
    int64_t here = smaller(LANES, count - m);
    for (int64_t r = 0; r < here; r++) from[r] = src + positions[m + r] * src_row;
    transpose_rows(kt + at + m, row, from, here, dim);
  }
}

/* Rows 0..count of dst ([count, dp]) = the rows positions[..] of src (rows src_row floats apart). */
WIDE static void gather_rows(float* dst, int64_t dp, const float* src, int64_t src_row, const int64_t* positions,
                             int64_t count, int64_t dim) {
  for (int64_t m = 0; m < count; m++) memcpy(dst + m * dp, src + positions[m] * src_row, dim * sizeof(float));
}

/* Group g of a plan: its queries' and keys' positions and counts, the last and the padded width of its rows of
   scores (the text keys, then its keys), and its mask's rows. */
typedef struct {
  const int64_t *queries, *keys;
  int64_t rows, count, last, width;
  const uint8_t* allowed;
} group_view;

INLINE group_view group_at(const group_plan* plan, int64_t g) {
  int64_t count = plan->key_start[g + 1] - plan->key_start[g];
  return (group_view){plan->queries + plan->query_start[g], plan->keys + plan->key_start[g],
                      plan->query_start[g + 1] - plan->query_start[g], count, plan->text_len + count - 1,
                      round_up(plan->text_len + count, COLS), plan->allowed + plan->mask_start[g]};
}

/* A group's scores row (its image keys from column text_len) with the keys the mask disallows at -inf. */
WIDE static void mask_row(float* row, int64_t text_len, const uint8_t* allowed, int64_t keys) {
  for (int64_t m = 0; m < keys; m++)
    if (!allowed[m]) row[text_len + m] = -INFINITY;
}

/* ... and the same keys' probabilities made exactly 0 (the softmax leaves e^-87 there). */
WIDE static void unmask_row(float* row, int64_t text_len, const uint8_t* allowed, int64_t keys) {
  for (int64_t m = 0; m < keys; m++)
    if (!allowed[m]) row[text_len + m] = 0.0f;
}

WIDE static void grouped_forward_head(const head_task* task) {
  const group_plan* plan = task->groups;
  int64_t n = task->n, dim = task->dim, dp = round_up(dim, COLS), text = plan->text_len;
  int64_t wide = group_wide(plan), tall = group_tall(plan);
  float *qs = task->scratch, *kt = qs + n * dp, *vg = kt + dp * wide, *scores = vg + wide * dp;
  float *o = scores + tall * wide, *qg = o + tall * dp;
  forward_inputs(task, qs, kt, vg, text, wide);
  causal_forward_rows(task, qs, kt, vg, wide, scores, o, text);
  for (int64_t g = 0; g < plan->count; g++) {
    group_view group = group_at(plan, g);
    gather_columns(kt, wide, text, task->k, task->qkv_row, group.keys, group.count, dim);
    gather_rows(vg + text * dp, dp, task->v, task->qkv_row, group.keys, group.count, dim);
    gather_rows(qg, dp, qs, dp, group.queries, group.rows, dp);
    product(scores, wide, qg, dp, 1, kt, wide, group.rows, group.width, dp, 0, LIMIT_NONE, 0);
    for (int64_t r = 0; r < group.rows; r++) {
      float* row = scores + r * wide;
      mask_row(row, text, group.allowed + r * group.count, group.count);
      task->lse[group.queries[r]] = softmax_row(task, row, group.last, group.width, group.queries[r]);
      unmask_row(row, text, group.allowed + r * group.count, group.count);
    }
    product(o, dp, scores, wide, 1, vg, dp, group.rows, dp, group.last + 1, 0, LIMIT_NONE, 0);
    for (int64_t r = 0; r < group.rows; r++)
      copy_unpadded(task->out + group.queries[r] * task->out_row, task->out_row, o + r * dp, 1, dim, dp, 1.0f);
  }
}

/* to[positions[m]] += from[m] for rows of dp floats. */
WIDE static void scatter_add_rows(float* to, const float* from, const int64_t* positions, int64_t count, int64_t dp) {
  for (int64_t m = 0; m < count; m++) {
    float *dst = to + positions[m] * dp;
    const float* src = from + m * dp;
    for (int64_t c = 0; c < dp; c += LANES) store(dst + c, load(dst + c) + load(src + c));
  }
}

WIDE static void grouped_backward_head(const head_task* task) {
  const group_plan* plan = task->groups;
  int64_t n = task->n, dim = task->dim, dp = round_up(dim, COLS), text = plan->text_len;
  int64_t wide = group_wide(plan), tall = group_tall(plan), key_rows = group_keys_rows(n, plan);
  float *qs = task->scratch, *gp = qs + n * dp, *kt = gp + n * dp, *vt = kt + dp * wide, *kg = vt + dp * wide;
  float *added = kg + wide * dp, *gk = added + wide * dp, *gv = gk + key_rows * dp, *probs = gv + key_rows * dp;
  float *gs = probs + tall * wide, *gq = gs + tall * wide, *qg = gq + tall * dp, *gg = qg + plan->max_queries * dp;
  float* delta = gg + plan->max_queries * dp;
  backward_inputs(task, qs, gp, kt, kg, vt, text, wide, gk, key_rows, delta);
  causal_backward_rows(task, qs, gp, kt, kg, vt, wide, gk, gv, probs, gs, gq, delta, text);
  for (int64_t g = 0; g < plan->count; g++) {
    group_view group = group_at(plan, g);
    gather_columns(kt, wide, text, task->k, task->qkv_row, group.keys, group.count, dim);
    gather_columns(vt, wide, text, task->v, task->qkv_row, group.keys, group.count, dim);
    gather_rows(kg + text * dp, dp, task->k, task->qkv_row, group.keys, group.count, dim);
    gather_rows(qg, dp, qs, dp, group.queries, group.rows, dp);
    gather_rows(gg, dp, gp, dp, group.queries, group.rows, dp);
    product(probs, wide, qg, dp, 1, kt, wide, group.rows, group.width, dp, 0, LIMIT_NONE, 0);
    product(gs, wide, gg, dp, 1, vt, wide, group.rows, group.width, dp, 0, LIMIT_NONE, 0);
    for (int64_t r = 0; r < group.rows; r++) {
      float *p = probs + r * wide, *gr = gs + r * wide;
      mask_row(p, text, group.allowed + r * group.count, group.count);
      exp_shifted(p, group.last, group.width, task->lse[group.queries[r]]);
      unmask_row(p, text, group.allowed + r * group.count, group.count);
      softmax_gradient_row(task, p, gr, group.last, group.width, group.queries[r], delta[group.queries[r]]);
    }
    /* The text keys' terms add to their rows of gv and gk in place, the group's keys' through `added`. */
    product(gv, dp, probs, 1, wide, gg, dp, text, dp, group.rows, 0, LIMIT_NONE, 1);
    product(added, dp, probs + text, 1, wide, gg, dp, group.count, dp, group.rows, 0, LIMIT_NONE, 0);
    scatter_add_rows(gv, added, group.keys, group.count, dp);
    product(gk, dp, gs, 1, wide, qg, dp, text, dp, group.rows, 0, LIMIT_NONE, 1);
    product(added, dp, gs + text, 1, wide, qg, dp, group.count, dp, group.rows, 0, LIMIT_NONE, 0);
    scatter_add_rows(gk, added, group.keys, group.count, dp);
    product(gq, dp, gs, wide, 1, kg, dp, group.rows, dp, group.last + 1, 0, LIMIT_NONE, 0);
    for (int64_t r = 0; r < group.rows; r++)
      copy_unpadded(task->grad_q + group.queries[r] * task->grad_qkv_row, task->grad_qkv_row, gq + r * dp, 1, dim,
                    dp, task->scale);
  }
  copy_unpadded(task->grad_k, task->grad_qkv_row, gk, n, dim, dp, 1.0f);
  copy_unpadded(task->grad_v, task->grad_qkv_row, gv, n, dim, dp, 1.0f);
}

/* The (batch row, head) pairs split between the threads, each with scratch of its own. Returns 0, 1 where the
   scratch could not be allocated, 2 where dalle_wide_kernels_run() is 0. */
static int each_head(head_task shared, int64_t batch, int64_t heads, const int64_t* qkv_strides,
                     const int64_t* out_strides, const int64_t* grad_strides, int backward, int threads) {
  if (!dalle_wide_kernels_run()) return 2;
  int failed = 0;
  int64_t n = shared.n, dim = shared.dim, scratch_floats;
  const group_plan* groups = shared.groups;
  if (groups)
    scratch_floats = backward ? grouped_backward_scratch(n, dim, groups) : grouped_forward_scratch(n, dim, groups);
  else
    scratch_floats = backward ? backward_scratch(n, dim) : forward_scratch(n, dim);
#pragma omp parallel num_threads(threads)
  {
    float* scratch = malloc(scratch_floats * sizeof(float));
    if (scratch == NULL) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < batch * heads; i++) {
      if (scratch == NULL) continue;
      int64_t b = i / heads, h = i % heads;
      head_task task = shared;
      task.q = shared.q + b * qkv_strides[1] + h * qkv_strides[2];
      task.k = task.q + qkv_strides[0];
      task.v = task.k + qkv_strides[0];
      task.out = shared.out + b * out_strides[0] + h * out_strides[1];
      task.lse = shared.lse + i * shared.n;
      task.scratch = scratch;
      task.head_hash = mix32(shared.head_hash ^ mix32((uint32_t)i)); /* shared.head_hash: the seed */
      if (backward) {
        task.grad = shared.grad + b * out_strides[0] + h * out_strides[1];
        task.grad_q = shared.grad_q + b * grad_strides[1] + h * grad_strides[2];
        task.grad_k = task.grad_q + grad_strides[0];
        task.grad_v = task.grad_k + grad_strides[0];
        (groups ? grouped_backward_head : backward_head)(&task);
      } else {
        (groups ? grouped_forward_head : forward_head)(&task);
      }
    }
    free(scratch);
  }
  return failed;
}

/* Dropout with probability 0 <= dropout < 1 (0: none) from seed. */
static void with_dropout(head_task* shared, float dropout, uint32_t seed) {
  shared->dropped_below = (uint32_t)((double)dropout * 4294967296.0);
  shared->kept_scale = 1.0f / (1.0f - dropout);
  shared->head_hash = seed;
}

/* qkv: q, k, v [batch, heads, n, dim] at qkv + (0, 1, 2) * qkv_strides[0], each with strides (qkv_strides[1..3], 1);
   out [batch, heads, n, dim] with strides (out_strides[0..2], 1); lse contiguous [batch, heads, n]; the
   probabilities dropped with probability dropout (0 <= dropout < 1), drawn from seed; groups NULL (every earlier
   key) or the image queries' groups of keys (group_plan). Returns as each_head. */
int dalle_causal_attention(const float* qkv, float* out, float* lse, int64_t batch, int64_t heads, int64_t n,
                           int64_t dim, const int64_t* qkv_strides, const int64_t* out_strides, float scale,
                           float dropout, uint32_t seed, int threads, const group_plan* groups) {
  head_task shared = {.q = qkv, .qkv_row = qkv_strides[3], .out = out, .out_row = out_strides[2], .lse = lse,
                      .n = n, .dim = dim, .scale = scale, .groups = groups};
  with_dropout(&shared, dropout, seed);
  return each_head(shared, batch, heads, qkv_strides, out_strides, NULL, 0, threads);
}

/* The gradients for grad (the loss's gradient for out, in out's strides), written into grad_qkv (as qkv, with
   strides grad_strides). lse, dropout, seed, groups: the forward's. */
int dalle_causal_attention_backward(const float* qkv, const float* out, const float* grad, const float* lse,
                                    float* grad_qkv, int64_t batch, int64_t heads, int64_t n, int64_t dim,
                                    const int64_t* qkv_strides, const int64_t* out_strides,
                                    const int64_t* grad_strides, float scale, float dropout, uint32_t seed,
                                    int threads, const group_plan* groups) {
  head_task shared = {.q = qkv, .qkv_row = qkv_strides[3], .out = (float*)out, .grad = grad,
                      .out_row = out_strides[2], .lse = (float*)lse, .grad_q = grad_qkv,
                      .grad_qkv_row = grad_strides[3], .n = n, .dim = dim, .scale = scale, .groups = groups};
  with_dropout(&shared, dropout, seed);
  return each_head(shared, batch, heads, qkv_strides, out_strides, grad_strides, 1, threads);
}
