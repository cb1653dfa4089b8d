// qmatmul_q8a: the many-row product of AVX2 builds with int8 activations and int16 pair sums (prompts).
// Part of the kernels' one translation unit: ops.cpp includes every part, in order, and registers the ops.
#pragma once

#include "products_wide.h"

namespace {

// ------------------------------------------------------------------------------------------------ qmatmul_q8a
// x @ W^T for many rows where W's codes span at most 64 values (GGUF's 4, 5 and 6-bit types) in groups of 32:
//
//   out[m, n] = sum_g  s[n, g] d[m, g] sum_{k in g} u[n, k] q[m, k]  +  o'[n, g] d[m, g] sum_{k in g} q[m, k]
//
// with u = code + bias in [0, umax] (unsigned), o' = offset - bias s, and x's group g of row m rounded to int8
// q = round(x / d), d = max|x| / 127: the exact weights times x rounded to 8 bits per group of 32 (what llama.cpp
// computes for these types). The integer sums are exact; the float32 sums run over g in order, so a row's bits do
// not depend on the other rows or the thread.
//
// Why: on AVX2 without VNNI, vpmaddubsw (32 byte products into 16 int16 pair sums) is the one multiply that beats
// float32 FMAs, and only if its pair sums add in int16 (vpaddw, any vector pipe) before one vpmaddwd widens them:
// with u <= umax and |q| <= 128, S steps add without overflow while S * 2 * umax * 128 <= 32767 (S = 8 for 4 bits,
// 4 for 5, 2 for 6): 8 products per 8 + 8 / S multiplies, against 8 per two FMAs.
//
// Layout: 8 outputs across a vector, int16 lanes 2i and 2i + 1 are output i's pairs (2t, 2t + 1) and (16 + 2t,
// 17 + 2t) of a group at step t = 0..7, so vpmaddwd with ones sums a lane pair into output i's int32. W's rows are
// re-laid per call in panels of 8 (q8a_panel); x's rows as int32 words [q(2t), q(2t + 1), q(16 + 2t), q(17 + 2t)]
// (q8a_quantize), each broadcast against a panel's step.
#ifdef AVX2_ONLY
constexpr bool kQ8a = true;
constexpr int Q8A_G = 32;  // the group: 8 steps of 4 bytes per output
#ifndef Q8A_MR_OVERRIDE
constexpr int Q8A_MR = 3;  // rows of x per register tile
constexpr int Q8A_NV = 2;  // vectors of 8 outputs per register tile
#else
constexpr int Q8A_MR = Q8A_MR_OVERRIDE;
constexpr int Q8A_NV = Q8A_NV_OVERRIDE;
#endif
constexpr int Q8A_NP = 8 * Q8A_NV;  // outputs per panel

// The steps of int16 sums that fit before widening, for codes in [0, umax].
static inline int q8a_steps(int64_t umax) {
  const int64_t s = 32767 / (2 * 128 * std::max<int64_t>(umax, 1));
  return s >= 8 ? 8 : s >= 4 ? 4 : s >= 2 ? 2 : 1;
}

// 32 bytes (inputs 0..15 low, 16..31 high) as 8 int32 words, word t = bytes (2t, 2t + 1, 16 + 2t, 17 + 2t).
static inline __m256i q8a_pairs(__m256i v) {
  const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
  return _mm256_set_m128i(_mm_unpackhi_epi16(lo, hi), _mm_unpacklo_epi16(lo, hi));
}

// Row m of x: per group its 8 words (q8a_pairs of its int8 values), d and d * sum q (NaN d where the group is not
// finite, so the output is NaN as the float product's would be).
static inline void q8a_quantize(const float* xr, int64_t K, int32_t* words, float* d, float* dsum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t g = 0; g < K / Q8A_G; ++g) {
    const float* xg = xr + g * Q8A_G;
    __m256 v[4], amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xg + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
      sum = _mm256_add_ps(sum, v[i]);
    }
    const __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    const __m128 a2 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
    const float am = std::max(_mm_cvtss_f32(a2), _mm_cvtss_f32(_mm_movehdup_ps(a2)));
    const float s = hsum8(sum);
    if (!std::isfinite(s) || !std::isfinite(am)) {
      std::memset(words + g * 8, 0, 32);
      d[g] = dsum[g] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const __m256 inv = _mm256_set1_ps(am > 0.f ? 127.f / am : 0.f);
    __m256i qi[4];
    for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // nearest, ties to even
    // int32 -> int8 in input order: packs interleave 128-bit halves, the permute puts them back.
    const __m256i w16a = _mm256_packs_epi32(qi[0], qi[1]), w16b = _mm256_packs_epi32(qi[2], qi[3]);
    const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16a, w16b),
                                                   _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + g * 8), q8a_pairs(q8));
    const __m256i q16 = _mm256_maddubs_epi16(_mm256_set1_epi8(1), q8);  // pair sums, then all 32
    const __m256i q32 = _mm256_madd_epi16(q16, _mm256_set1_epi16(1));
    const __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(q32), _mm256_extracti128_si256(q32, 1));
    const __m128i t2 = _mm_add_epi32(t4, _mm_unpackhi_epi64(t4, t4));
    const int32_t qsum = _mm_cvtsi128_si32(t2) + _mm_extract_epi32(t2, 1);
    d[g] = am / 127.f;
    dsum[g] = d[g] * static_cast<float>(qsum);
  }
}

// W's rows [n, n + nr) (nr <= 8 NV, int8 codes [nr][K]) as a panel: per group, per step t, NV vectors of 32 bytes
// (outputs 8 v .. 8 v + 7; u = code + bias, rows past nr zero); then per group the rows' scales and o' (zero past nr).
template <int NV>
static inline void q8a_panel(const int8_t* c, const float* sc, const float* off, int64_t K, int64_t nr, int bias,
                             uint8_t* wp, float* sp, float* op) {
  const int64_t ng = K / Q8A_G;
  const __m256i b = _mm256_set1_epi8(static_cast<char>(bias));
  for (int64_t g = 0; g < ng; ++g) {
    for (int v = 0; v < NV; ++v) {
      __m256 r[8];
      for (int64_t i = 0; i < 8; ++i) {
        const int64_t row = 8 * v + i;
        const __m256i x = row < nr ? _mm256_add_epi8(
                                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + row * K + g * Q8A_G)), b)
                                   : _mm256_setzero_si256();
        r[i] = _mm256_castsi256_ps(q8a_pairs(x));
      }
      transpose8(r);  // r[t]: word i = row i's word t
      for (int t = 0; t < 8; ++t) _mm256_storeu_ps(reinterpret_cast<float*>(wp + ((g * 8 + t) * NV + v) * 32), r[t]);
    }
    for (int64_t i = 0; i < 8 * NV; ++i) {
      const float s = i < nr ? sc[i * ng + g] : 0.f;
      sp[g * 8 * NV + i] = s;
      op[g * 8 * NV + i] = i < nr ? (off != nullptr ? off[i * ng + g] : 0.f) - static_cast<float>(bias) * s : 0.f;
    }
  }
}

// MR rows of x (words, d, dsum at row stride K / 4 words and ng floats) against one panel of 8 NV outputs into
// res[MR][8 NV]. Every S steps the int16 sums widen (vpmaddwd with ones) and add, as float32, times s d, into the
// row's sums: one chain per output in the order of the groups and steps.
template <int MR, int NV, int S, bool OFF>
static inline void q8a_tile(const int32_t* xw, const float* xd, const float* xs, int64_t K, const uint8_t* wp,
                            const float* sp, const float* op, float* res) {
  const int64_t ng = K / Q8A_G, ws = K / 4;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* wg = wp + g * 8 * NV * 32;
    for (int t0 = 0; t0 < 8; t0 += S) {
      __m256i i16[MR][NV];
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) i16[r][v] = _mm256_setzero_si256();
      for (int t = t0; t < t0 + S; ++t) {
        __m256i w[NV];
        for (int v = 0; v < NV; ++v) w[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(wg + (t * NV + v) * 32));
        for (int r = 0; r < MR; ++r) {
          const __m256i a = _mm256_set1_epi32(xw[r * ws + g * 8 + t]);
          for (int v = 0; v < NV; ++v) i16[r][v] = _mm256_add_epi16(i16[r][v], _mm256_maddubs_epi16(w[v], a));
        }
      }
      for (int r = 0; r < MR; ++r) {
        const __m256 d = _mm256_set1_ps(xd[r * ng + g]);
        for (int v = 0; v < NV; ++v)
          acc[r][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(i16[r][v], ones)),
                                      _mm256_mul_ps(_mm256_load_ps(sp + (g * NV + v) * 8), d), acc[r][v]);
      }
    }
    if (OFF)
      for (int r = 0; r < MR; ++r) {
        const __m256 xsum = _mm256_set1_ps(xs[r * ng + g]);
        for (int v = 0; v < NV; ++v)
          acc[r][v] = _mm256_fmadd_ps(_mm256_load_ps(op + (g * NV + v) * 8), xsum, acc[r][v]);
      }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(res + (r * NV + v) * 8, acc[r][v]);
}

template <int S, bool OFF>
static inline void q8a_rows(const int32_t* xw, const float* xd, const float* xs, int64_t M, int64_t K,
                            const uint8_t* wp, const float* sp, const float* op, int64_t n, int64_t nr, int64_t N,
                            float* outp) {
  constexpr int NV = Q8A_NV;
  const int64_t ng = K / Q8A_G, ws = K / 4;
  alignas(32) float res[Q8A_MR * 8 * NV];
  for (int64_t m0 = 0; m0 < M; m0 += Q8A_MR) {
    const int64_t mr = std::min<int64_t>(Q8A_MR, M - m0);
    const int32_t* w = xw + m0 * ws;
    const float *d = xd + m0 * ng, *s = xs + m0 * ng;
    with_rows(mr, [&](auto rows) {
      if constexpr (decltype(rows)::value <= Q8A_MR) q8a_tile<decltype(rows)::value, NV, S, OFF>(w, d, s, K, wp, sp, op, res);
    });
    for (int64_t r = 0; r < mr; ++r) std::copy(res + r * 8 * NV, res + r * 8 * NV + nr, outp + (m0 + r) * N + n);
  }
}

// Rows of x per block: a block's int8 words stay in L2 while every panel of the thread's range runs against it.
constexpr int64_t Q8A_MC = 128;

template <typename Codes>
static void q8a_product(const float* xp, int64_t M, int64_t K, const Codes& codes, const float* sp_in,
                        const float* op_in, int64_t N, int bias, int64_t umax, float* outp) {
  const int64_t ng = K / Q8A_G, ws = K / 4;
  std::vector<int32_t> xw(M * ws);
  std::vector<float> xd(M * ng), xs(M * ng);
  par_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) q8a_quantize(xp + m * K, K, xw.data() + m * ws, xd.data() + m * ng,
                                                       xs.data() + m * ng);
  });
  const bool off = op_in != nullptr || bias != 0;
  const int S = q8a_steps(umax);
  const int64_t np = (N + Q8A_NP - 1) / Q8A_NP;
  par_for(0, np, 4, [&](int64_t begin, int64_t end) {
    // The thread's panels, re-laid once: K bytes + 2 ng floats each (at most ~2.6 MB for the 270M's 2048 x 640).
    std::vector<uint8_t> wstore((end - begin) * Q8A_NP * K + 32);
    uint8_t* const wp = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(wstore.data()) + 31) & ~uintptr_t{31});
    std::vector<float> sstore((end - begin) * Q8A_NP * ng + 8), ostore((end - begin) * Q8A_NP * ng + 8);
    float* const spp = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(sstore.data()) + 31) & ~uintptr_t{31});
    float* const opp = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(ostore.data()) + 31) & ~uintptr_t{31});
    std::vector<int8_t> staging(codes.staging(Q8A_NP, K));
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p * Q8A_NP, nr = std::min<int64_t>(Q8A_NP, N - n);
      q8a_panel<Q8A_NV>(codes.rows(n, nr, staging.data()), sp_in + n * ng, op_in != nullptr ? op_in + n * ng : nullptr,
                        K, nr, bias, wp + (p - begin) * Q8A_NP * K, spp + (p - begin) * Q8A_NP * ng,
                        opp + (p - begin) * Q8A_NP * ng);
    }
    for (int64_t m0 = 0; m0 < M; m0 += Q8A_MC) {
      const int64_t mc = std::min(Q8A_MC, M - m0);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p * Q8A_NP, nr = std::min<int64_t>(Q8A_NP, N - n);
        const uint8_t* w = wp + (p - begin) * Q8A_NP * K;
        const float *s = spp + (p - begin) * Q8A_NP * ng, *o = opp + (p - begin) * Q8A_NP * ng;
        const int32_t* a = xw.data() + m0 * ws;
        const float *d = xd.data() + m0 * ng, *xsum = xs.data() + m0 * ng;
        float* out = outp + m0 * N;
        const auto run = [&](auto steps) {
          constexpr int SS = decltype(steps)::value;
          if (off) q8a_rows<SS, true>(a, d, xsum, mc, K, w, s, o, n, nr, N, out);
          else q8a_rows<SS, false>(a, d, xsum, mc, K, w, s, o, n, nr, N, out);
        };
        switch (S) {
          case 8: run(std::integral_constant<int, 8>{}); break;
          case 4: run(std::integral_constant<int, 4>{}); break;
          case 2: run(std::integral_constant<int, 2>{}); break;
          default: run(std::integral_constant<int, 1>{}); break;
        }
      }
    }
  });
}
#else
constexpr bool kQ8a = false;
#endif

bool q8a_available() { return kQ8a; }

static inline void check_q8a(const char* op, int64_t K, int64_t G, int64_t bias, int64_t umax) {
  TORCH_CHECK(kQ8a, op, ": this build has no AVX2-only path");
  TORCH_CHECK(G == 32 && K % 32 == 0, op, ": needs groups of 32 (G=", G, ", K=", K, ")");
  TORCH_CHECK(umax >= 0 && umax <= 63 && bias >= -128 && bias <= 128, op, ": codes + bias must lie in [0, 63] (bias ",
              bias, ", umax ", umax, ")");
}

// codes: int8 [N, K] whose every code + bias lies in [0, umax] (the caller's promise: qmatmul_q8a_span gives both).
at::Tensor qmatmul_q8a(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& scales_in,
                       const c10::optional<at::Tensor>& offsets_in, int64_t G, int64_t bias, int64_t umax) {
  TORCH_CHECK(codes_in.dim() == 2 && codes_in.scalar_type() == at::kChar, "qmatmul_q8a: codes must be int8 [N, K]");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == codes_in.size(1), "qmatmul_q8a: x must be [M, K] with K = codes'");
  const int64_t N = codes_in.size(0), K = codes_in.size(1);
  check_q8a("qmatmul_q8a", K, G, bias, umax);
  const at::Tensor offsets = check_product("qmatmul_q8a", x_in, scales_in, offsets_in, N, G);
  const at::Tensor x = x_in.contiguous(), scales = scales_in.contiguous(), codes = codes_in.contiguous();
  at::Tensor out = at::empty({x.size(0), N}, x.options());
#ifdef AVX2_ONLY
  q8a_product(x.data_ptr<float>(), x.size(0), K, WideI8{codes.data_ptr<int8_t>(), K}, scales.data_ptr<float>(),
              offsets.defined() ? offsets.data_ptr<float>() : nullptr, N, static_cast<int>(bias), umax,
              out.data_ptr<float>());
#endif
  return out;
}

// Packed codes (codes.h): u = code + bias is what they store, so umax = 2^bits - 1 bounds it.
at::Tensor qmatmul_q8a_packed(const at::Tensor& x_in, const at::Tensor& packed_in, int64_t bits, int64_t bias,
                              const at::Tensor& scales_in, const c10::optional<at::Tensor>& offsets_in, int64_t G) {
  TORCH_CHECK(x_in.dim() == 2, "qmatmul_q8a_packed: x must be [M, K]");
  const int64_t K = x_in.size(1);
  check_packed("qmatmul_q8a_packed", packed_in, bits, bias, K, G);
  check_q8a("qmatmul_q8a_packed", K, G, bias, (int64_t{1} << bits) - 1);
  const int64_t N = packed_in.size(0);
  const at::Tensor offsets = check_product("qmatmul_q8a_packed", x_in, scales_in, offsets_in, N, G);
  const at::Tensor x = x_in.contiguous(), scales = scales_in.contiguous(), packed = packed_in.contiguous();
  at::Tensor out = at::empty({x.size(0), N}, x.options());
#ifdef AVX2_ONLY
  with_bits(bits, [&](auto b) {
    const WidePacked<decltype(b)::value> codes{packed.data_ptr<uint8_t>(), K, packed.size(1), static_cast<int8_t>(bias)};
    q8a_product(x.data_ptr<float>(), x.size(0), K, codes, scales.data_ptr<float>(),
                offsets.defined() ? offsets.data_ptr<float>() : nullptr, N, static_cast<int>(bias),
                (int64_t{1} << bits) - 1, out.data_ptr<float>());
  });
#endif
  return out;
}

}  // namespace
