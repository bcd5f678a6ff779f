// Fused fp32 CPU kernels for MindSpore's Custom(func_type="aot") op; built by cpu_kernels.py on first use.
//
// MindSpore 2.10 composes GroupNorm, GELU and SiLU on CPU from single-threaded element-wise kernels, 15-40x slower
// than PyTorch (benchmarks/cpu_ops.py). Each kernel here is one pass (two for the norms) over memory, vectorised by
// the compiler and split across OpenMP threads (the runtime MindSpore's oneDNN already uses).
//
// The convolution and the linear layer use oneDNN's SGEMM directly: MindSpore's MatMul costs 1.2-3x PyTorch's
// time on these shapes, and a convolution's im2col then lives in a small per-thread buffer instead of a graph
// tensor (graph mode on CPU keeps every intermediate tensor alive for the whole step).
//
// Calling convention of an aot kernel: params holds the inputs then the outputs; shapes/ndims/dtypes describe them.
// A non-zero return makes MindSpore raise.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// oneDNN's row-major single-threaded SGEMM: C = alpha * op(A) op(B) + beta * C. Linked from the libdnnl that
// MindSpore ships, whose threadpool runtime leaves the calls sequential; the kernels below split the work across
// OpenMP threads themselves.
extern "C" int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                          int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

namespace {

int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

bool all_f32(int count, const char **dtypes) {
  for (int i = 0; i < count; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  return true;
}

// exp(x) as 2^k * p(r), r = x - k ln2 in [-ln2/2, ln2/2], p the degree-7 Taylor polynomial (relative error < 1e-7
// after rounding). Written out, without libm, so that loops calling it vectorise without -ffast-math.
inline float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = x * 1.44269504088896341f;
  const int k = static_cast<int>(t + (t >= 0.0f ? 0.5f : -0.5f));
  const float r = x - static_cast<float>(k) * 0.693147180559945309f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (k + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, the size of fp32 rounding near 1).
inline float erf_f32(float x) {
  const float a = x < 0.0f ? -x : x;
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  // past a = 4 the product is below half an ulp of 1 and y rounds to 1; capping a there keeps exp away from the
  // subnormal results (slow to compute) that it reaches past a = 9.3, with the same y
  const float c = a < 4.0f ? a : 4.0f;
  const float y = 1.0f - p * t * exp_f32(-c * c);
  return x < 0.0f ? -y : y;
}

inline float gelu_f32(float x) { return 0.5f * x * (1.0f + erf_f32(x * 0.707106781186547524f)); }

inline float silu_f32(float x) { return x / (1.0f + exp_f32(-x)); }

// Mean and 1/sqrt(var + eps) of n contiguous values; two passes, as PyTorch, for accuracy on large offsets.
inline void moments(const float *x, int64_t n, float eps, float *mean, float *rstd) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i];
  const float m = s / static_cast<float>(n);
  float q = 0.0f;
#pragma omp simd reduction(+ : q)
  for (int64_t i = 0; i < n; ++i) q += (x[i] - m) * (x[i] - m);
  *mean = m;
  *rstd = 1.0f / std::sqrt(q / static_cast<float>(n) + eps);
}

// GroupNorm, optionally followed by SiLU: x [B, G, C/G, S], weight and bias [G, C/G], eps [1] -> y like x.
// The group count travels in the input's shape, so one kernel serves every configuration.
// The shared inputs of the two norms: x, weight, bias, eps [1] in, y out.
struct NormArgs {
  const float *x, *w, *b;
  float eps;
  float *y;
};

NormArgs norm_args(void **params) {
  return {static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
          static_cast<const float *>(params[2]), *static_cast<const float *>(params[3]),
          static_cast<float *>(params[4])};
}

template <bool kSilu>
int group_norm_impl(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 5 || !all_f32(5, dtypes) || ndims[0] != 4) return 1;
  const int64_t groups = shapes[0][0] * shapes[0][1], cg = shapes[0][2], s = shapes[0][3];
  const int64_t channels = shapes[0][1] * cg;
  const auto [x, w, b, eps, y] = norm_args(params);
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    float mean, rstd;
    moments(x + g * cg * s, cg * s, eps, &mean, &rstd);
    for (int64_t c = 0; c < cg; ++c) {
      const int64_t ch = (g * cg + c) % channels;
      const float scale = rstd * w[ch], shift = b[ch] - mean * scale;
      const float *xc = x + (g * cg + c) * s;
      float *yc = y + (g * cg + c) * s;
      if (kSilu) {
#pragma omp simd
        for (int64_t i = 0; i < s; ++i) yc[i] = silu_f32(xc[i] * scale + shift);
      } else {
#pragma omp simd
        for (int64_t i = 0; i < s; ++i) yc[i] = xc[i] * scale + shift;
      }
    }
  }
  return 0;
}

}  // namespace

extern "C" {

// y = gelu(x), exact (erf) form.
int gelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 2 || !all_f32(2, dtypes)) return 1;
  const int64_t n = numel(ndims[0], shapes[0]);
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] = gelu_f32(x[i]);
  return 0;
}

// GEGLU: x [..., 2d] -> y [..., d] = x[..., :d] * gelu(x[..., d:]) (diffusers' hidden, gate = proj(x).chunk(2)).
int geglu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 2 || !all_f32(2, dtypes)) return 1;
  const int64_t two_d = shapes[0][ndims[0] - 1], d = two_d / 2;
  const int64_t rows = numel(ndims[0], shapes[0]) / two_d;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float *h = x + r * two_d, *g = h + d;
    float *o = y + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] = h[i] * gelu_f32(g[i]);
  }
  return 0;
}

// LayerNorm over the last axis: x [..., d], weight [d], bias [d], eps [1] -> y [..., d].
int layer_norm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 5 || !all_f32(5, dtypes)) return 1;
  const int64_t d = shapes[0][ndims[0] - 1], rows = numel(ndims[0], shapes[0]) / d;
  const auto [x, w, b, eps, y] = norm_args(params);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    float mean, rstd;
    moments(x + r * d, d, eps, &mean, &rstd);
    const float *xr = x + r * d;
    float *yr = y + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
  }
  return 0;
}

int group_norm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return group_norm_impl<false>(nparam, params, ndims, shapes, dtypes);
}

int group_norm_silu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return group_norm_impl<true>(nparam, params, ndims, shapes, dtypes);
}

// y [M, O] = x [M, K] W[O, K]^T (+ bias [O]); x and y may have any leading shape. Threads split the rows of x, or
// the output features when there are too few rows to share.
int linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if ((nparam != 3 && nparam != 4) || !all_f32(nparam, dtypes)) return 1;
  const bool has_bias = nparam == 4;
  const int64_t k = shapes[0][ndims[0] - 1], m = numel(ndims[0], shapes[0]) / k, o = shapes[1][0];
  if (shapes[1][1] != k) return 2;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *bias = has_bias ? static_cast<const float *>(params[2]) : nullptr;
  float *y = static_cast<float *>(params[nparam - 1]);
  const int threads = omp_get_max_threads();
  const bool split_rows = m >= 64 * threads;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t total = split_rows ? m : o, chunk = (total + nt - 1) / nt;
    const int64_t lo = std::min(total, t * chunk), hi = std::min(total, lo + chunk);
    if (hi > lo) {
      const int64_t rows = split_rows ? hi - lo : m, cols = split_rows ? o : hi - lo;
      const float *xa = split_rows ? x + lo * k : x;
      const float *wb = split_rows ? w : w + lo * k;
      float *yc = split_rows ? y + lo * o : y + lo;
      if (bias != nullptr)
        for (int64_t r = 0; r < rows; ++r) std::memcpy(yc + r * o, bias + (split_rows ? 0 : lo), cols * sizeof(float));
      failed |= dnnl_sgemm('N', 'T', rows, cols, k, 1.0f, xa, k, wb, k, bias != nullptr ? 1.0f : 0.0f, yc, o) != 0;
    }
  }
  return failed ? 3 : 0;
}

// y [A, N, M, K] = x [A, M, N, K]: axes 1 and 2 swapped (heads split or merged with K = head size; tokens to
// channels and back with K = 1), in 32 x 32 tiles. MindSpore 2.10's CPU graph keeps every Transpose output alive
// until the graph ends (12 chained transposes of 64 MB peak at 1.7 GB; 12 of these, at 0.14 GB): the SDXL UNet step
// at 512 px held 3.9 GB above its weights with Transposes, 1.2 GB with this kernel.
int swap_axes12(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 2 || !all_f32(2, dtypes) || ndims[0] != 4) return 1;
  const int64_t a = shapes[0][0], m = shapes[0][1], n = shapes[0][2], k = shapes[0][3];
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  constexpr int64_t kTile = 32;
  const int64_t tm = (m + kTile - 1) / kTile, tn = (n + kTile - 1) / kTile;
#pragma omp parallel for schedule(static)
  for (int64_t piece = 0; piece < a * tm * tn; ++piece) {
    const int64_t ai = piece / (tm * tn), m0 = (piece / tn % tm) * kTile, n0 = piece % tn * kTile;
    const int64_t m1 = std::min(m, m0 + kTile), n1 = std::min(n, n0 + kTile);
    for (int64_t mi = m0; mi < m1; ++mi)
      for (int64_t ni = n0; ni < n1; ++ni) {
        const float *src = x + ((ai * m + mi) * n + ni) * k;
        float *dst = y + ((ai * n + ni) * m + mi) * k;
        if (k == 1)
          *dst = *src;
        else
          std::memcpy(dst, src, k * sizeof(float));
      }
  }
  return 0;
}

// Attention without a score tensor: q [B, H, Sq, D], k [B, H, Sk, D], v [B, H, Sk, Dv] (, an additive key mask
// [B or 1, H or 1, 1, Sk]) -> y [B, H, Sq, Dv] = softmax(q k^T / sqrt(D) + mask) v. Work is cut into (batch x head,
// block of query rows) pieces shared among threads; each piece's scores live in a per-thread buffer of about 1 MB,
// so the [B, H, Sq, Sk] scores and probabilities the composed ops keep (1.3 GB each in an SDXL attn1 layer at
// 1024 px) never exist.
int attention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if ((nparam != 4 && nparam != 5) || !all_f32(nparam, dtypes) || ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4)
    return 1;
  const int64_t heads = shapes[0][1], bh = shapes[0][0] * heads, sq = shapes[0][2], d = shapes[0][3];
  const int64_t sk = shapes[1][2], dv = shapes[2][3];
  if (shapes[1][0] * shapes[1][1] != bh || shapes[2][0] * shapes[2][1] != bh || shapes[1][3] != d ||
      shapes[2][2] != sk)
    return 2;
  const bool masked = nparam == 5;
  if (masked && (ndims[3] != 4 || shapes[3][2] != 1 || shapes[3][3] != sk ||
                 (shapes[3][0] != 1 && shapes[3][0] != shapes[0][0]) || (shapes[3][1] != 1 && shapes[3][1] != heads)))
    return 2;
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *mask = masked ? static_cast<const float *>(params[3]) : nullptr;
  float *y = static_cast<float *>(params[nparam - 1]);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t rows = std::clamp<int64_t>((int64_t{1} << 18) / std::max<int64_t>(sk, 1), 16, 256);
  const int64_t blocks = (sq + rows - 1) / rows, pieces = bh * blocks;
  int failed = 0;
#pragma omp parallel reduction(| : failed)
  {
    std::vector<float> scores(rows * sk);
#pragma omp for schedule(static)
    for (int64_t piece = 0; piece < pieces; ++piece) {
      const int64_t h = piece / blocks, r0 = (piece % blocks) * rows, n = std::min(rows, sq - r0);
      const float *m = nullptr;
      if (masked) m = mask + ((shapes[3][0] == 1 ? 0 : h / heads) * shapes[3][1] + (shapes[3][1] == 1 ? 0 : h % heads)) * sk;
      float *s = scores.data();
      failed |= dnnl_sgemm('N', 'T', n, sk, d, scale, q + (h * sq + r0) * d, d, k + h * sk * d, d, 0.0f, s, sk) != 0;
      for (int64_t r = 0; r < n; ++r) {
        float *row = s + r * sk;
        if (masked) {
#pragma omp simd
          for (int64_t i = 0; i < sk; ++i) row[i] += m[i];
        }
        float top = row[0], sum = 0.0f;
#pragma omp simd reduction(max : top)
        for (int64_t i = 0; i < sk; ++i) top = std::max(top, row[i]);
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < sk; ++i) {
          row[i] = exp_f32(row[i] - top);
          sum += row[i];
        }
        // Masked keys leave exp(-87) ~ 1.6e-38, which the division would make subnormal, and subnormals are slow to
        // compute and multiply (an SDXL sa64 read layer on standard-normal inputs took 5.7 s, not 0.22 s:
        // benchmarks/masked_attention.py). Those probabilities become 0 first, a change below 1.2e-38.
        const float inv = 1.0f / sum, least = std::numeric_limits<float>::min() * sum;
#pragma omp simd
        for (int64_t i = 0; i < sk; ++i) {
          const float e = row[i] < least ? 0.0f : row[i];
          row[i] = e * inv;
        }
      }
      failed |= dnnl_sgemm('N', 'N', n, dv, sk, 1.0f, s, sk, v + h * sk * dv, dv, 0.0f, y + (h * sq + r0) * dv, dv) != 0;
    }
  }
  return failed ? 3 : 0;
}

namespace {

// Rows [r0, r1) of the im2col of image x [C, H, W] into cols [C*k*k, (r1-r0)*wo]; zero padding is implicit.
void im2col_rows(const float *x, int64_t c, int64_t h, int64_t w, int64_t k, int64_t s, int64_t top, int64_t left,
                 int64_t wo, int64_t r0, int64_t r1, float *cols) {
  const int64_t n = (r1 - r0) * wo;
  for (int64_t ci = 0; ci < c; ++ci) {
    for (int64_t tap = 0; tap < k * k; ++tap) {
      const int64_t i = tap / k, j = tap % k;
      float *dst = cols + (ci * k * k + tap) * n;
      // output column ox reads input column ox*s + j - left; [ox0, ox1) are the ones inside the image
      const int64_t ox0 = std::min(wo, left - j > 0 ? (left - j + s - 1) / s : int64_t{0});
      const int64_t ox1 = std::max(ox0, std::min(wo, w + left - j > 0 ? (w + left - j + s - 1) / s : int64_t{0}));
      for (int64_t oy = r0; oy < r1; ++oy) {
        const int64_t iy = oy * s + i - top;
        float *row = dst + (oy - r0) * wo;
        if (iy < 0 || iy >= h) {
          std::memset(row, 0, wo * sizeof(float));
          continue;
        }
        const float *in = x + (ci * h + iy) * w + j - left;
        std::memset(row, 0, ox0 * sizeof(float));
        if (s == 1) {
          std::memcpy(row + ox0, in + ox0, (ox1 - ox0) * sizeof(float));
        } else {
          for (int64_t ox = ox0; ox < ox1; ++ox) row[ox] = in[ox * s];
        }
        std::memset(row + ox1, 0, (wo - ox1) * sizeof(float));
      }
    }
  }
}

}  // namespace

// NCHW convolution: x [B, C, H, W], weight [O, C, k, k], bias [O], spec int64 [stride, top, bottom, left, right]
// -> y [B, O, Ho, Wo]. Work is cut into (image, band of output rows) pieces shared among threads; each piece builds
// its im2col in a small per-thread buffer and runs one SGEMM writing straight into y.
int conv2d(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 5 || ndims[0] != 4 || ndims[1] != 4 || std::strcmp(dtypes[0], "float32") != 0 ||
      std::strcmp(dtypes[1], "float32") != 0 || std::strcmp(dtypes[2], "float32") != 0 ||
      std::strcmp(dtypes[3], "int64") != 0 || std::strcmp(dtypes[4], "float32") != 0)
    return 1;
  const int64_t b = shapes[0][0], c = shapes[0][1], h = shapes[0][2], w = shapes[0][3];
  const int64_t o = shapes[1][0], k = shapes[1][2];
  const int64_t *spec = static_cast<const int64_t *>(params[3]);
  const int64_t s = spec[0], top = spec[1], bottom = spec[2], left = spec[3], right = spec[4];
  const int64_t ho = (h + top + bottom - k) / s + 1, wo = (w + left + right - k) / s + 1;
  if (shapes[1][1] != c || shapes[4][1] != o || shapes[4][2] != ho || shapes[4][3] != wo) return 2;
  const float *x = static_cast<const float *>(params[0]);
  const float *wt = static_cast<const float *>(params[1]);
  const float *bias = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[4]);
  const int64_t kk = c * k * k;
  const bool direct = k == 1 && s == 1 && top + bottom + left + right == 0;  // the image is its own im2col
  const int threads = omp_get_max_threads();
  // ~4 MB of im2col per piece (it stays in cache for the SGEMM; 32 MB was 1.4x slower at 320 channels, 64x64),
  // but at least 256 columns, below which SGEMM loses efficiency
  const int64_t fit = (int64_t{4} << 20) / (kk * wo * 4), wide = (256 + wo - 1) / wo;
  int64_t rows = std::max<int64_t>(1, std::min<int64_t>(ho, std::max(fit, wide)));
  while (rows > 1 && b * ((ho + rows - 1) / rows) < threads) rows = (rows + 1) / 2;
  const int64_t bands = (ho + rows - 1) / rows;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    std::vector<float> cols(direct ? 0 : kk * rows * wo);
#pragma omp for schedule(dynamic)
    for (int64_t piece = 0; piece < b * bands; ++piece) {
      const int64_t bi = piece / bands, r0 = (piece % bands) * rows, r1 = std::min(ho, r0 + rows);
      const int64_t n = (r1 - r0) * wo;
      const float *image = x + bi * c * h * w;
      float *out = y + bi * o * ho * wo + r0 * wo;
      for (int64_t oi = 0; oi < o; ++oi) std::fill(out + oi * ho * wo, out + oi * ho * wo + n, bias[oi]);
      const float *src = image + r0 * wo;
      int64_t ld = ho * wo;
      if (!direct) {
        im2col_rows(image, c, h, w, k, s, top, left, wo, r0, r1, cols.data());
        src = cols.data();
        ld = n;
      }
      failed |= dnnl_sgemm('N', 'N', o, n, kk, 1.0f, wt, kk, src, ld, 1.0f, out, ho * wo) != 0;
    }
  }
  return failed ? 3 : 0;
}

}  // extern "C"
