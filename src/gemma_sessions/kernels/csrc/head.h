// The LM head: argmax, and q8_head (the exact greedy token through int8 activations).
// Part of the kernels' one translation unit: ops.cpp includes every part, in order, and registers the ops.
#pragma once

#include "products.h"

namespace {

// argmax over the last dimension of float32 [R, V] -> int64 [R], as torch.argmax: the first maximal index, and a NaN
// counts as the maximum (the first NaN wins). Each row is split into chunks scanned in parallel (a vocabulary row of
// 262144 logits at a fraction of torch.argmax's time, whose OpenMP region also left a worker spinning into the next
// step's kernels).
constexpr int64_t ARGMAX_CHUNK = 32768;

static std::pair<float, int64_t> argmax_range(const float* x, int64_t b, int64_t e) {
  int64_t i = b, best_i = b;
  float best = x[b];
  if (std::isnan(best)) return {best, b};
#ifdef __AVX512F__
  if (e - b >= 32) {
    __m512 bv = _mm512_loadu_ps(x + b);
    __m512i bi = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(b)),
                                  _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    __m512i idx = bi;
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 nan = _mm512_cmp_ps_mask(bv, bv, _CMP_UNORD_Q);
    for (i = b + 16; i + 16 <= e; i += 16) {
      idx = _mm512_add_epi32(idx, step);
      const __m512 v = _mm512_loadu_ps(x + i);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, bv, _CMP_GT_OQ);  // strictly greater: a lane keeps its first max
      bv = _mm512_mask_mov_ps(bv, gt, v);
      bi = _mm512_mask_mov_epi32(bi, gt, idx);
    }
    if (nan) {
      for (int64_t j = b; j < e; ++j)
        if (std::isnan(x[j])) return {x[j], j};
    }
    alignas(64) float vals[16];
    alignas(64) int32_t ids[16];
    _mm512_store_ps(vals, bv);
    _mm512_store_si512(ids, bi);
    best = vals[0];
    best_i = ids[0];
    for (int l = 1; l < 16; ++l)
      if (vals[l] > best || (vals[l] == best && ids[l] < best_i)) best = vals[l], best_i = ids[l];
  }
#endif
  for (; i < e; ++i) {
    if (std::isnan(x[i])) return {x[i], i};
    if (x[i] > best) best = x[i], best_i = i;
  }
  return {best, best_i};
}

at::Tensor argmax_rows(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "argmax: x must be float32 [R, V]");
  const int64_t R = x_in.size(0), V = x_in.size(1);
  TORCH_CHECK(V > 0 && V < (int64_t{1} << 31), "argmax: V must be in [1, 2^31)");
  const at::Tensor x = x_in.contiguous();
  const int64_t C = (V + ARGMAX_CHUNK - 1) / ARGMAX_CHUNK;
  std::vector<std::pair<float, int64_t>> part(R * C);
  const float* xp = x.data_ptr<float>();
  par_for(0, R * C, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t r = t / C, c = t % C;
      part[t] = argmax_range(xp + r * V, c * ARGMAX_CHUNK, std::min(V, (c + 1) * ARGMAX_CHUNK));
    }
  });
  at::Tensor out = at::empty({R}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    auto best = part[r * C];  // chunks in order: a later chunk wins only if strictly greater, or the first NaN
    for (int64_t c = 1; c < C && !std::isnan(best.first); ++c) {
      const auto& p = part[r * C + c];
      if (std::isnan(p.first) || p.first > best.first) best = p;
    }
    op[r] = best.second;
  }
  return out;
}

// q8_head: the greedy token of the LM head, EXACT, from a fast approximation with int8 activations.
//
// The head is the largest product of a decode step (262144 x 640 on the 270M). Its codes are int8 already; x is
// quantized per group of 32 to int8 (q = round(x / s), s = max|x| / 127, as llama.cpp's Q8_0 activations), so each
// group's product is an exact integer sum of int8 x int8 computed by AVX512-VNNI (vpdpbusd: 64 products per
// instruction, against 32 for the bf16 kernel, and no conversion of the weights). That approximation is not the
// exact head, but its error is bounded, by one number per row for every output: with e = x - s q (|e| <= emax per
// group),
//
//   |exact[n] - approx[n]| <= sum_g emax_g * A[n, g] <= bound = sum_g emax_g * max_n' A[n', g],
//   A[n, g] = sum_{k in g} |W[n, k]|
//
// (plus a margin for float32 rounding of both sides: bx below). With T = max_n approx[n] - bound, the exact maximum
// is among the candidates {n : approx[n] + bound >= T}: their exact logits (dot_block, the very arithmetic of
// qmatmul, hence of a decode row alone) decide, ties to the lowest index as torch.argmax. So the token is the
// exact head's greedy token, bit for bit, whatever the row count. Candidates are found in one pass: each thread
// keeps a running max of approx - bound per row and records outputs whose approx + bound reaches it; the final
// threshold (the max over threads) filters the records.
//
// The bound per output (A[n, g] in place of its max over n) is tighter, ~4 candidates per row on the 270M's real
// hidden states against ~9, but it cost a multiply-add per row, group and 16 outputs in the loop: ~13 vector
// instructions per 8 vpdpbusd where there are now 10. One bound per row made the 16-row head faster
// (bench/head.py); the extra exact logits cost little.
//
// Weights are re-laid once (q8_head_pack): codes + 128 as uint8 [N/16][K/4][16][4] (16 outputs per vector, 4
// inputs per lane: vpdpbusd's layout), scales as [N/16][K/32][16], and max_n A[n, g] as [K/32]. Needs AVX512-VNNI,
// G = 32, no offsets (a Q8_0 or symmetric head), N % 16 == 0.
//
// On AVX2 without AVX-512 (Q8_LANES = 8): the same codes + 128 as [N/8][K/4][8][4], scales as [N/8][K/32][8] (float16
// where every scale is a float16 value, exactly: a Q8_0 head's are; else float32). Four
// products per lane by vpmaddubsw (uint8 codes + 128 times int8 q), then vpmaddwd with ones into int32: 32 products
// in two multiplies, against 16 for two float FMAs. vpmaddubsw saturates a pair's sum at int16, so x is quantized to
// 7 bits there (s = max|x| / 63, |q| <= 63: 255 * 63 * 2 < 32767), which doubles the error bound (about twice the
// candidates, each one exact logit); the same correction, bound and exact decision. (vpsignb on |q| and signed codes
// kept 8 bits but cost a third instruction per 32 products: slower.)
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
constexpr bool kQ8Head = true;
constexpr int64_t Q8_LANES = 16;
#elif defined(AVX2_ONLY)
constexpr bool kQ8Head = true;
constexpr int64_t Q8_LANES = 8;
#else
constexpr bool kQ8Head = false;
constexpr int64_t Q8_LANES = 16;
#endif

bool q8_head_available() { return kQ8Head; }

// Blocks ahead whose weights the first row block prefetches into L2. The head streams from memory (168 MB of codes
// on the 270M, per call), and without it a thread computing on them read far below the rate it reads at when only
// reading: a 16-row call took about the sum of its compute and memory times; with it, markedly less (the distance
// matters little; the L1 hint gained nothing). Below 4 rows the call is bound by memory alone and the hardware
// prefetcher does better by itself.
constexpr int64_t Q8_PREFETCH = 8;
constexpr int64_t Q8_MB = 8;  // rows per block: 8 chains + 8 value accumulators + 8 weight vectors
constexpr int Q8_MB8 = 6;     // AVX2: 6 int32 sums + 6 value accumulators (4 rows: slower at 8 rows)

std::tuple<at::Tensor, at::Tensor, at::Tensor> q8_head_pack(const at::Tensor& codes_in, const at::Tensor& scales_in) {
  TORCH_CHECK(codes_in.dim() == 2 && codes_in.scalar_type() == at::kChar, "q8_head_pack: codes must be int8 [N, K]");
  const int64_t N = codes_in.size(0), K = codes_in.size(1);
  TORCH_CHECK(N % 16 == 0 && K % 32 == 0, "q8_head_pack: N % 16 and K % 32 must be 0");
  constexpr int64_t L = Q8_LANES;
  const int64_t ng = K / 32;
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.dim() == 2 && scales_in.size(0) == N &&
              scales_in.size(1) == ng, "q8_head_pack: scales must be float32 [N, K/32]");
  const at::Tensor codes = codes_in.contiguous(), scales = scales_in.contiguous();
  // AVX2: the scales in float16 where every one is a float16 value (a Q8_0 head: GGUF stores them so), exactly: the
  // call reads 2 bytes less per group of 32 codes (~6% of the 270M head's bytes)
  const bool half = Q8_LANES == 8 && scales.to(at::kHalf).to(at::kFloat).equal(scales);
  at::Tensor wq = at::empty({N / L, K / 4, L, 4}, codes.options().dtype(at::kByte));
  at::Tensor sw = at::empty({N / L, ng, L}, scales.options().dtype(half ? at::kHalf : at::kFloat));
  at::Tensor a_all = at::empty({N, ng}, scales.options());  // sum |W| per output and group
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  uint8_t* wp = wq.data_ptr<uint8_t>();
  float* swp = half ? nullptr : sw.data_ptr<float>();
  at::Half* shp = half ? sw.data_ptr<at::Half>() : nullptr;
  float* awp = a_all.data_ptr<float>();
  par_for(0, N / L, 16, [&](int64_t b, int64_t e) {
    for (int64_t nb = b; nb < e; ++nb) {
      for (int64_t j = 0; j < L; ++j) {
        const int64_t n = nb * L + j;
        const int8_t* c = cp + n * K;
        for (int64_t k = 0; k < K; ++k)
          wp[((nb * (K / 4) + k / 4) * L + j) * 4 + k % 4] = static_cast<uint8_t>(static_cast<int>(c[k]) + 128);
        for (int64_t g = 0; g < ng; ++g) {
          int64_t a = 0;
          for (int64_t k = g * 32; k < g * 32 + 32; ++k) a += std::abs(static_cast<int>(c[k]));
          const float s = sp[n * ng + g];
          if (half) shp[(nb * ng + g) * L + j] = at::Half(s);
          else swp[(nb * ng + g) * L + j] = s;
          // rounded up: the bound must not be smaller than the real sum of |W|
          awp[n * ng + g] = static_cast<float>(static_cast<double>(std::abs(s)) * a * (1.0 + 1e-6));
        }
      }
    }
  });
  return {wq, sw, std::get<0>(a_all.max(0))};  // aw: the largest sum |W| of each group over the outputs
}

struct Q8Cand {
  int64_t row, n;
  float hi;
};

#if defined(__AVX512F__) && defined(__AVX512VNNI__)

// MB rows (int8 x [MB][K], per-row group data [MB][ng]) against one block of 16 outputs: the approximate logits.
// Each row's group sum is one chain of 8 vpdpbusd, the rows' chains interleaved (up to 8 rows: 8 chains in flight
// cover the instruction's latency; with 4 rows, two chains per row were needed, and merging them cost an add).
template <int MB>
static inline void q8_block(const uint8_t* wb, const float* swb, const int8_t* xq, int64_t K, const float* sx,
                            const int32_t* corr, int64_t ng, __m512* val, bool prefetch) {
  __m512 accf[MB];
  for (int r = 0; r < MB; ++r) accf[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const __m512i* wg = reinterpret_cast<const __m512i*>(wb + g * 8 * 64);
    __m512i w[8];
    for (int j = 0; j < 8; ++j) w[j] = _mm512_loadu_si512(wg + j);
    const __m512 s = _mm512_loadu_ps(swb + g * 16);
    if (prefetch) {  // the block Q8_PREFETCH ahead: its weights and scales into L2
      const uint8_t* pw = wb + Q8_PREFETCH * 16 * K + g * 512;
      for (int j = 0; j < 8; ++j) _mm_prefetch(reinterpret_cast<const char*>(pw + 64 * j), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(swb + (Q8_PREFETCH * ng + g) * 16), _MM_HINT_T1);
    }
    __m512i a0[MB];
    for (int r = 0; r < MB; ++r) a0[r] = _mm512_set1_epi32(corr[r * ng + g]);  // -128 * sum(q): the +128 of the weights
    for (int j = 0; j < 8; ++j) {
      for (int r = 0; r < MB; ++r) {
        int32_t q0;
        std::memcpy(&q0, xq + r * K + g * 32 + 4 * j, 4);
        a0[r] = _mm512_dpbusd_epi32(a0[r], w[j], _mm512_set1_epi32(q0));
      }
    }
    for (int r = 0; r < MB; ++r) {
      const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(a0[r]), _mm512_set1_ps(sx[r * ng + g]));
      accf[r] = _mm512_fmadd_ps(f, s, accf[r]);
    }
  }
  for (int r = 0; r < MB; ++r) val[r] = accf[r];
}

static inline float hmax(__m512 v) { return _mm512_reduce_max_ps(v); }
#endif

#ifdef AVX2_ONLY

// MB rows (7-bit q [MB][K], per-row group scales and corrections [MB][ng]) against one block of 8 outputs: the
// approximate logits. Per group and 4 inputs: the weights' vector loaded once, per row vpmaddubsw + vpmaddwd +
// vpaddd into the row's int32 sum (exact), then per group the float sum.
static inline __m256 load_scales8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load_scales8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <int MB, typename S>
static inline void q8_block8(const uint8_t* wb, const S* swb, const int8_t* xq, int64_t K, const float* sx,
                             const int32_t* corr, int64_t ng, __m256* val, bool prefetch) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 accf[MB];
  for (int r = 0; r < MB; ++r) accf[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* wg = wb + g * 8 * 32;
    if (prefetch) {  // the block Q8_PREFETCH ahead: its weights and scales into L2
      const uint8_t* pw = wg + Q8_PREFETCH * 8 * K;
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(pw + 64 * j), _MM_HINT_T1);
      if (g % (64 / (8 * sizeof(S))) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(swb + (Q8_PREFETCH * ng + g) * 8), _MM_HINT_T1);
    }
    __m256i acc[MB];
    for (int r = 0; r < MB; ++r) acc[r] = _mm256_set1_epi32(corr[r * ng + g]);  // -128 * sum(q): the +128 of W
    for (int j = 0; j < 8; ++j) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 32 * j));
      for (int r = 0; r < MB; ++r) {
        int32_t q4;
        std::memcpy(&q4, xq + r * K + g * 32 + 4 * j, 4);
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_set1_epi32(q4)), ones));
      }
    }
    const __m256 s = load_scales8(swb + g * 8);
    for (int r = 0; r < MB; ++r) {
      const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(sx[r * ng + g]));
      accf[r] = _mm256_fmadd_ps(f, s, accf[r]);
    }
  }
  for (int r = 0; r < MB; ++r) val[r] = accf[r];
}

static inline float hmax8(__m256 v) {
  __m128 b = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  b = _mm_max_ps(b, _mm_movehl_ps(b, b));
  b = _mm_max_ss(b, _mm_movehdup_ps(b));
  return _mm_cvtss_f32(b);
}
#endif

// q8_head's driver in either width: the vector of L approximate logits, its operations, the block kernel.
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
struct Q8W {
  using V = __m512;
  using S = float;
  static constexpr int64_t L = 16, GRAIN = 64;
  static constexpr int MB = Q8_MB;
  static V set1(float f) { return _mm512_set1_ps(f); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static unsigned ge(V a, float t) { return _mm512_cmp_ps_mask(a, set1(t), _CMP_GE_OQ); }  // lanes a >= t
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static float top(V v) { return hmax(v); }
  template <int R>
  static void block(const uint8_t* wb, const float* swb, const int8_t* xq, int64_t K, const float* sx,
                    const int32_t* corr, int64_t ng, V* val, bool prefetch) {
    q8_block<R>(wb, swb, xq, K, sx, corr, ng, val, prefetch);
  }
};
#elif defined(AVX2_ONLY)
template <typename SC>
struct Q8W {
  using V = __m256;
  using S = SC;
  static constexpr int64_t L = 8, GRAIN = 128;
  static constexpr int MB = Q8_MB8;
  static V set1(float f) { return _mm256_set1_ps(f); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static unsigned ge(V a, float t) {
    return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a, set1(t), _CMP_GE_OQ)));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static float top(V v) { return hmax8(v); }
  template <int R>
  static void block(const uint8_t* wb, const S* swb, const int8_t* xq, int64_t K, const float* sx,
                    const int32_t* corr, int64_t ng, V* val, bool prefetch) {
    q8_block8<R>(wb, swb, xq, K, sx, corr, ng, val, prefetch);
  }
};
#endif

// x [M, K] float32 -> (token [M] int64: the exact greedy token, or -1 where x is not finite (the caller computes
// that row exactly); candidates [M] int64: how many exact logits decided it; logits [M, N]: the approximation, when
// want_logits, else empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> q8_head(const at::Tensor& x_in, const at::Tensor& wq,
                                                       const at::Tensor& sw, const at::Tensor& aw,
                                                       const at::Tensor& codes_in, const at::Tensor& scales_in,
                                                       bool want_logits) {
  TORCH_CHECK(kQ8Head, "q8_head: this build has neither AVX512-VNNI nor AVX2");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "q8_head: x must be float32 [M, K]");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = codes_in.size(0), ng = K / 32;
  TORCH_CHECK(codes_in.dim() == 2 && codes_in.size(1) == K && K % 32 == 0 && N % 16 == 0,
              "q8_head: codes must be [N, K] with N % 16 == 0 and K % 32 == 0");
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.dim() == 2 && scales_in.size(0) == N &&
              scales_in.size(1) == ng, "q8_head: scales must be float32 [N, K/32]");
  TORCH_CHECK(sw.scalar_type() == at::kFloat || (Q8_LANES == 8 && sw.scalar_type() == at::kHalf),
              "q8_head: packed scales must be float32 (float16 on AVX2) (q8_head_pack)");
  TORCH_CHECK(wq.scalar_type() == at::kByte && wq.numel() == N * K && wq.is_contiguous() &&
              sw.numel() == N * ng && aw.numel() == ng && sw.is_contiguous() && aw.is_contiguous(),
              "q8_head: packed weights do not match the codes (q8_head_pack)");
  const at::Tensor x = x_in.contiguous(), codes = codes_in.contiguous(), scales = scales_in.contiguous();
  at::Tensor token = at::full({M}, -1, x.options().dtype(at::kLong));
  at::Tensor ncand = at::zeros({M}, x.options().dtype(at::kLong));
  at::Tensor logits = want_logits ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
#if (defined(__AVX512F__) && defined(__AVX512VNNI__)) || defined(AVX2_ONLY)
  const float* xp = x.data_ptr<float>();
  // quantize x: per row and group, s = max|x| / 127, q = round(x / s) (nearest even), emax = max |x - s q|
  std::vector<int8_t> xq(M * K);
  std::vector<float> sx(M * ng), bx(M * ng);
  std::vector<int32_t> corr(M * ng);
  std::vector<char> finite(M, 1);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < ng; ++g) {
      const float* xg = xp + m * K + g * 32;
      float amax = 0.f;
      for (int k = 0; k < 32; ++k) amax = std::max(amax, std::abs(xg[k]));
      if (!std::isfinite(amax)) {
        finite[m] = 0;
        amax = 0.f;
      }
      // 8 bits (VNNI), 7 on AVX2 (vpmaddubsw's int16 pair sums, see above)
      constexpr float levels = Q8_LANES == 16 ? 127.f : 63.f;
      const float s = amax / levels, inv = s > 0.f ? levels / amax : 0.f;
      float emax = 0.f;
      int32_t qsum = 0;
      for (int k = 0; k < 32; ++k) {
        const int q = std::clamp(static_cast<int>(std::nearbyint(xg[k] * inv)), -static_cast<int>(levels),
                                 static_cast<int>(levels));
        xq[m * K + g * 32 + k] = static_cast<int8_t>(q);
        qsum += q;
        emax = std::max(emax, std::abs(xg[k] - s * static_cast<float>(q)));
      }
      sx[m * ng + g] = s;
      corr[m * ng + g] = -128 * qsum;
      // the float32 rounding of the approximation and of the exact product: well within 1e-3 s (see above)
      bx[m * ng + g] = emax * (1.f + 1e-6f) + 1e-3f * s;
    }
  }
  // one bound per row for every output: sum_g bx_g * (the largest sum |W| of group g), rounded up
  const float* awp = aw.data_ptr<float>();
  std::vector<float> brow(M, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    double b = 0.0;
    for (int64_t g = 0; g < ng; ++g) b += static_cast<double>(bx[m * ng + g]) * awp[g];
    brow[m] = static_cast<float>(b * (1.0 + 1e-6));
  }
  const uint8_t* wp = wq.data_ptr<uint8_t>();
  float* lp = want_logits ? logits.data_ptr<float>() : nullptr;
  std::mutex mu;
  std::vector<float> thr_all(M, -INFINITY);
  std::vector<Q8Cand> cands;
  const auto scan = [&](auto tag) {
  using W = decltype(tag);
  using V = typename W::V;
  const typename W::S* swp = reinterpret_cast<const typename W::S*>(sw.data_ptr());
  par_for(0, N / W::L, W::GRAIN, [&](int64_t begin, int64_t end) {
    std::vector<V> tv(M, W::set1(-INFINITY));
    std::vector<float> thr(M, -INFINITY);
    std::vector<Q8Cand> mine;
    V val[W::MB];
    for (int64_t nb = begin; nb < end; ++nb) {
      const uint8_t* wb = wp + nb * W::L * K;
      // full passes first: the first pass streams (and prefetches) the weights from memory, and a full one hides
      // that best (balanced passes, 5 + 4 at 9 rows and 6 + 6 at 12, were slower)
      row_passes<W::MB, false>(M, [&](auto rows, int64_t m0, int64_t mb) {
        W::template block<decltype(rows)::value>(wb, swp + nb * ng * W::L, xq.data() + m0 * K, K, sx.data() + m0 * ng,
                                        corr.data() + m0 * ng, ng, val, m0 == 0 && M >= 4 && nb + Q8_PREFETCH < end);
        for (int64_t r = 0; r < mb; ++r) {
          const int64_t m = m0 + r;
          if (lp != nullptr) W::store(lp + m * N + nb * W::L, val[r]);
          const V bnd = W::set1(brow[m]);
          const V lo = W::sub(val[r], bnd), hi = W::add(val[r], bnd);
          tv[m] = W::max(tv[m], lo);
          unsigned k = W::ge(hi, thr[m]);
          if (k == 0) continue;
          thr[m] = std::max(thr[m], W::top(tv[m]));
          k = W::ge(hi, thr[m]);
          alignas(64) float h[W::L];
          W::store(h, hi);
          for (int64_t j = 0; j < W::L; ++j)
            if (k & (1u << j)) mine.push_back({m, nb * W::L + j, h[j]});
        }
      });
    }
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t m = 0; m < M; ++m) thr_all[m] = std::max(thr_all[m], W::top(tv[m]));
    cands.insert(cands.end(), mine.begin(), mine.end());
  });
  };
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  scan(Q8W{});
#else
  if (sw.scalar_type() == at::kHalf) scan(Q8W<at::Half>{});
  else scan(Q8W<float>{});
#endif
  // the exact logits of the candidates decide (in order of n: ties go to the lowest index); the records below the
  // final threshold (most of them: a thread records against its running threshold) are dropped before the sort
  cands.erase(std::remove_if(cands.begin(), cands.end(), [&](const Q8Cand& c) {
    return !finite[c.row] || c.hi < thr_all[c.row];
  }), cands.end());
  std::sort(cands.begin(), cands.end(), [](const Q8Cand& a, const Q8Cand& b) {
    return a.row != b.row ? a.row < b.row : a.n < b.n;
  });
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  std::vector<float> best(M, -INFINITY);
  int64_t* tp = token.data_ptr<int64_t>();
  int64_t* np = ncand.data_ptr<int64_t>();
  for (const Q8Cand& c : cands) {
    if (!finite[c.row] || c.hi < thr_all[c.row]) continue;
    float v;
    dot_block(xp + c.row * K, 1, K, I8Row{cp + c.n * K, 32}, sp + c.n * ng, 32, nullptr, nullptr, &v);
    np[c.row] += 1;
    if (std::isnan(v)) finite[c.row] = 0;  // (overflow): the caller's exact path decides as torch.argmax would
    if (tp[c.row] < 0 || v > best[c.row]) {  // in order of n: a tie keeps the lower index
      best[c.row] = v;
      tp[c.row] = c.n;
    }
  }
  for (int64_t m = 0; m < M; ++m)
    if (!finite[m]) tp[m] = -1;
#endif
  return {token, ncand, logits};
}

}  // namespace
