// Fused row ops: RMSNorm, residual + RMSNorm, GeGLU, q/k norm + RoPE (and q alone: q_norm_rope).
// Part of the kernels' one translation unit: ops.cpp includes every part, in order, and registers the ops.
#pragma once

#include "products.h"

namespace {

// Gemma's per-row normalisation with scale (1 + w), over D floats: out = x * rsqrt(mean(x^2) + eps) * scale.
static inline void norm_row(const float* x, const float* scale, int64_t D, float eps, float* out) {
  int64_t i = 0;
  float ss = 0.f;
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i), acc);
  ss = hsum(acc);
#endif
  for (; i < D; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (i = 0; i < D; ++i) out[i] = x[i] * inv * scale[i];
}

// Gemma RMSNorm over the last dimension in one pass per row: out = x * rsqrt(mean(x^2) + eps) * scale, where
// scale is the precomputed (1 + w). Float32 in and out; replaces ~6 torch ops (and their temporaries) per call.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& scale_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && scale_in.scalar_type() == at::kFloat, "rms_norm: float32 only");
  const int64_t D = x_in.size(-1);
  TORCH_CHECK(scale_in.numel() == D, "rms_norm: scale must have ", D, " elements");
  const at::Tensor x = x_in.contiguous(), scale = scale_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t rows = D ? x.numel() / D : 0;
  const float* xp = x.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  par_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) norm_row(xp + r * D, sp, D, static_cast<float>(eps), op + r * D);
  });
  return out;
}

// geglu: Gemma's MLP activation gelu_tanh(gate) * up for the GEMM path, reading the bf16 [N, 2I] output of the
// fused gate+up product and writing the bf16 [N, I] input of the down product. Computed in float32 and rounded once
// (round to nearest even), as converting to float32, applying F.gelu and the product, and converting back does;
// replaces three [N, I] float32 temporaries per layer on prefill.
// gelu_tanh(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3); as 1 + tanh(u) = 2 / (1 + exp(-2u)), it is
// x / (1 + exp(-2u)): one exp, no cancellation near 0 (float32 within a few ulps of torch's; one bf16 rounding after).
static inline float gelu_tanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.0f + std::exp(-2.0f * u));
}

// exp in SIMD lanes (exp16, exp8): n = round(x / ln2), r = x - n ln2 (ln2 in two parts), exp(r) = 1 + r + r^2 P(r)
// with Cephes' degree-5 polynomial P, times 2^n. Max error ~1-2 ulp.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

#ifdef __AVX512F__
// 16 floats; scalef handles overflow to inf and underflow to 0.
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.9f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x));
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

static inline __m512 gelu16(__m512 x) {
  const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0f), u))));
}

static inline __m512 load_bf16x16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#endif

#ifdef AVX2_ONLY
// 8 floats. No scalef: 2^n is built from the exponent bits, so x is clamped to [-87.3, 88.3] (2^n normal; below,
// exp is ~1e-38 instead of 0 or a denormal: gelu's x / (1 + e) does not see the difference).
static inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x));
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __m256 gelu8(__m256 x) {
  const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
  const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), u))));
}
#endif

at::Tensor geglu(const at::Tensor& gu_in) {
  TORCH_CHECK(gu_in.dim() == 2 && gu_in.size(1) % 2 == 0, "geglu: input must be [N, 2I]");
  TORCH_CHECK(gu_in.scalar_type() == at::kBFloat16 || gu_in.scalar_type() == at::kFloat, "geglu: bf16 or float32");
  const at::Tensor gu = gu_in.contiguous();
  const int64_t N = gu.size(0), I = gu.size(1) / 2;
  at::Tensor out = at::empty({N, I}, gu.options());
  const bool bf = gu.scalar_type() == at::kBFloat16;
  par_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t b, int64_t e) {
    std::vector<float> tmp(I);
    for (int64_t r = b; r < e; ++r) {
      float* o = bf ? tmp.data() : out.data_ptr<float>() + r * I;
      int64_t i = 0;
      if (bf) {
        const at::BFloat16* g = gu.data_ptr<at::BFloat16>() + r * 2 * I;
#ifdef __AVX512F__
        for (; i + 16 <= I; i += 16)
          _mm512_storeu_ps(o + i, _mm512_mul_ps(gelu16(load_bf16x16(g + i)), load_bf16x16(g + I + i)));
#elif defined(AVX2_ONLY)
        for (; i + 8 <= I; i += 8) _mm256_storeu_ps(o + i, _mm256_mul_ps(gelu8(load8(g + i)), load8(g + I + i)));
#endif
        for (; i < I; ++i) o[i] = gelu_tanh(static_cast<float>(g[i])) * static_cast<float>(g[I + i]);
        at::BFloat16* ob = out.data_ptr<at::BFloat16>() + r * I;
        for (int64_t j = 0; j < I; ++j) ob[j] = at::BFloat16(o[j]);  // round to nearest even
      } else {
        const float* g = gu.data_ptr<float>() + r * 2 * I;
#ifdef __AVX512F__
        for (; i + 16 <= I; i += 16)
          _mm512_storeu_ps(o + i, _mm512_mul_ps(gelu16(_mm512_loadu_ps(g + i)), _mm512_loadu_ps(g + I + i)));
#elif defined(AVX2_ONLY)
        for (; i + 8 <= I; i += 8)
          _mm256_storeu_ps(o + i, _mm256_mul_ps(gelu8(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(g + I + i)));
#endif
        for (; i < I; ++i) o[i] = gelu_tanh(g[i]) * g[I + i];
      }
    }
  });
  return out;
}


// add_rms_norm: the residual step between two products of a decoder layer, in one pass per row:
//   x' = x + norm(y) * s1   (s1 undefined: x + y, Gemma 1 has no post-norms)
//   h  = norm(x') * s2      (s2 undefined: h is not computed)
// float32 [N, D]; returns (x', h). Replaces three to five torch ops and their temporaries per call.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const at::Tensor& y_in,
                                                const c10::optional<at::Tensor>& s1_in,
                                                const c10::optional<at::Tensor>& s2_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && y_in.scalar_type() == at::kFloat && x_in.sizes() == y_in.sizes(),
              "add_rms_norm: x and y must be float32 of one shape");
  const int64_t D = x_in.size(-1), rows = D ? x_in.numel() / D : 0;
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const bool has1 = s1_in.has_value() && s1_in->defined(), has2 = s2_in.has_value() && s2_in->defined();
  const at::Tensor s1 = has1 ? s1_in->contiguous() : at::Tensor(), s2 = has2 ? s2_in->contiguous() : at::Tensor();
  TORCH_CHECK((!has1 || s1.numel() == D) && (!has2 || s2.numel() == D), "add_rms_norm: scales must have ", D, " elements");
  at::Tensor xo = at::empty_like(x), ho = has2 ? at::empty_like(x) : at::Tensor();
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  float* xop = xo.data_ptr<float>();
  par_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
    std::vector<float> tmp(D);
    for (int64_t r = b; r < e; ++r) {
      const float* xr = xp + r * D;
      const float* yr = yp + r * D;
      float* xo_r = xop + r * D;
      if (has1) {
        norm_row(yr, s1.data_ptr<float>(), D, static_cast<float>(eps), tmp.data());
        for (int64_t i = 0; i < D; ++i) xo_r[i] = xr[i] + tmp[i];
      } else {
        for (int64_t i = 0; i < D; ++i) xo_r[i] = xr[i] + yr[i];
      }
      if (has2) norm_row(xo_r, s2.data_ptr<float>(), D, static_cast<float>(eps), ho.data_ptr<float>() + r * D);
    }
  });
  return {xo, ho};
}

// qk_norm_rope: split a fused q|k|v projection [N, (Hq + 2 Hkv) D], apply the per-head q and k norms (Gemma 3;
// undefined scales: none) and RoPE in the rotate-half layout (x cos + roll(x, D/2) signed_sin, tables [N, D]) to q
// and k. Returns q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D], float32, in one pass instead of ~16 torch ops.
std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_norm_rope(const at::Tensor& qkv_in,
                                                            const c10::optional<at::Tensor>& qs_in,
                                                            const c10::optional<at::Tensor>& ks_in,
                                                            const at::Tensor& cos_in, const at::Tensor& sin_in,
                                                            int64_t Hq, int64_t Hkv, double eps) {
  TORCH_CHECK(qkv_in.dim() == 2 && qkv_in.scalar_type() == at::kFloat, "qk_norm_rope: qkv must be float32 [N, F]");
  const int64_t N = qkv_in.size(0), F = qkv_in.size(1);
  TORCH_CHECK(Hq > 0 && Hkv > 0 && F % (Hq + 2 * Hkv) == 0, "qk_norm_rope: width ", F, " is not (Hq + 2 Hkv) D");
  const int64_t D = F / (Hq + 2 * Hkv);
  TORCH_CHECK(D % 2 == 0, "qk_norm_rope: head_dim must be even");
  const at::Tensor qkv = qkv_in.contiguous(), cs = cos_in.contiguous(), sn = sin_in.contiguous();
  TORCH_CHECK(cs.scalar_type() == at::kFloat && sn.scalar_type() == at::kFloat && cs.numel() == N * D &&
              sn.numel() == N * D, "qk_norm_rope: cos and sin must be float32 [N, D]");
  const bool norm = qs_in.has_value() && qs_in->defined();
  const at::Tensor qs = norm ? qs_in->contiguous() : at::Tensor(), ks = norm ? ks_in->contiguous() : at::Tensor();
  TORCH_CHECK(!norm || (qs.numel() == D && ks.numel() == D), "qk_norm_rope: norm scales must have head_dim elements");
  at::Tensor q = at::empty({N, Hq, D}, qkv.options()), k = at::empty({N, Hkv, D}, qkv.options());
  at::Tensor v = qkv.narrow(1, (Hq + Hkv) * D, Hkv * D).reshape({N, Hkv, D}).contiguous();
  const float* src = qkv.data_ptr<float>();
  const int64_t half = D / 2;
  par_for(0, N * (Hq + Hkv), std::max<int64_t>(1, 8192 / D), [&](int64_t b, int64_t e) {
    std::vector<float> t(D);
    for (int64_t i = b; i < e; ++i) {
      const int64_t n = i / (Hq + Hkv), h = i % (Hq + Hkv);
      const bool is_q = h < Hq;
      const float* x = src + n * F + h * D;  // q heads, then k heads: contiguous in the fused row
      if (norm) norm_row(x, (is_q ? qs : ks).data_ptr<float>(), D, static_cast<float>(eps), t.data());
      else std::copy(x, x + D, t.data());
      float* out = is_q ? q.data_ptr<float>() + (n * Hq + h) * D : k.data_ptr<float>() + (n * Hkv + h - Hq) * D;
      const float* c = cs.data_ptr<float>() + n * D;
      const float* si = sn.data_ptr<float>() + n * D;
      for (int64_t j = 0; j < D; ++j) out[j] = t[j] * c[j] + t[j < half ? j + half : j - half] * si[j];
    }
  });
  return {q, k, v};
}

// q_norm_rope: qk_norm_rope's q part alone, for a layer whose projection is q only [N, Hq D] (a KV-shared layer reads
// another layer's K/V): the per-head q norm (undefined scale: none) and RoPE, the same arithmetic per head. Returns
// q [N, Hq, D] float32.
at::Tensor q_norm_rope(const at::Tensor& q_in, const c10::optional<at::Tensor>& qs_in, const at::Tensor& cos_in,
                       const at::Tensor& sin_in, int64_t Hq, double eps) {
  TORCH_CHECK(q_in.dim() == 2 && q_in.scalar_type() == at::kFloat, "q_norm_rope: q must be float32 [N, F]");
  const int64_t N = q_in.size(0), F = q_in.size(1);
  TORCH_CHECK(Hq > 0 && F % Hq == 0 && (F / Hq) % 2 == 0, "q_norm_rope: width ", F, " is not Hq D with D even");
  const int64_t D = F / Hq, half = D / 2;
  const at::Tensor qp = q_in.contiguous(), cs = cos_in.contiguous(), sn = sin_in.contiguous();
  TORCH_CHECK(cs.scalar_type() == at::kFloat && sn.scalar_type() == at::kFloat && cs.numel() == N * D &&
              sn.numel() == N * D, "q_norm_rope: cos and sin must be float32 [N, D]");
  const bool norm = qs_in.has_value() && qs_in->defined();
  const at::Tensor qs = norm ? qs_in->contiguous() : at::Tensor();
  TORCH_CHECK(!norm || qs.numel() == D, "q_norm_rope: the norm scale must have head_dim elements");
  at::Tensor q = at::empty({N, Hq, D}, qp.options());
  const float* src = qp.data_ptr<float>();
  par_for(0, N * Hq, std::max<int64_t>(1, 8192 / D), [&](int64_t b, int64_t e) {
    std::vector<float> t(D);
    for (int64_t i = b; i < e; ++i) {
      const float* x = src + i * D;  // row n = i / Hq, head i % Hq
      if (norm) norm_row(x, qs.data_ptr<float>(), D, static_cast<float>(eps), t.data());
      else std::copy(x, x + D, t.data());
      float* out = q.data_ptr<float>() + i * D;
      const float* c = cs.data_ptr<float>() + (i / Hq) * D;
      const float* si = sn.data_ptr<float>() + (i / Hq) * D;
      for (int64_t j = 0; j < D; ++j) out[j] = t[j] * c[j] + t[j < half ? j + half : j - half] * si[j];
    }
  });
  return q;
}

}  // namespace
