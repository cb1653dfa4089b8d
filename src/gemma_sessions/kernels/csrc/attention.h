// decode_attention: one query per row over keys read in place (paged or dense).
// Part of the kernels' one translation unit: ops.cpp includes every part, in order, and registers the ops.
#pragma once

#include "fused.h"

namespace {

// decode_attention: one query token per row attending over keys it reads IN PLACE through a slot index (the paged
// cache's pages, or a dense cache's rows), for the decode steps of the engine and of generate():
//
//   q      [B, Hq, D] float32                 one query per row, after RoPE
//   k, v   [S, Hkv, D] float32 or bfloat16     any strides on the first two dims, D contiguous
//   table  [B, P] int64, start, lengths [B]   row b sees lengths[b] keys from position start[b] of its block
//                                            table (see decode_attention below)
//   out    [B, Hq, D] float32
//
// Query head h uses kv head h / (Hq / Hkv) (GQA, as transformers' repeat_kv). Scores are float32 dot products
// times scale, soft-capped (cap * tanh(s / cap)) when softcap > 0, softmax in float32 (max subtracted), then the
// probability-weighted sum of values. No gather, no converted copy of K/V: each key row is read once per kv head.
// Parallel over (row, kv head).

#ifdef __AVX512F__
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

// A raw dot product as an attention score: times scale, then soft-capped (cap * tanh(s / cap)) when softcap > 0.
static inline float capped(float s, float scale, float softcap) {
  s *= scale;
  return softcap > 0.f ? std::tanh(s / softcap) * softcap : s;
}

// Softmax in float32 over each of g rows of len scores (max subtracted), in place; exp16 (~1-2 ulp) 16 at a time.
// With stats (a segment of a longer row): leaves exp(s - max) unnormalised and writes (max, sum) per row to stats.
static void softmax_rows(float* scores, int64_t g, int64_t len, float* stats = nullptr) {
  for (int64_t h = 0; h < g; ++h) {
    float* sc = scores + h * len;
    float mx = -INFINITY;
    for (int64_t j = 0; j < len; ++j) mx = std::max(mx, sc[j]);
    float sum = 0.f;
    int64_t j = 0;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= len; j += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + j), _mm512_set1_ps(mx)));
      _mm512_storeu_ps(sc + j, e);
      acc = _mm512_add_ps(acc, e);
    }
    sum = hsum(acc);
#endif
    for (; j < len; ++j) {
      sc[j] = std::exp(sc[j] - mx);
      sum += sc[j];
    }
    if (stats != nullptr) {
      stats[2 * h] = mx;
      stats[2 * h + 1] = sum;
      continue;
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < len; ++j) sc[j] *= inv;
  }
}

#ifdef __AVX512F__
// The same attention with GH query heads per kv head known at compile time and D % 64 == 0: each key and value
// vector is loaded and converted once for all GH heads, and the output is accumulated in registers 64 dims at a time.
// Keys ahead whose K and V rows attend_row_fast prefetches. The KV pages of a step are far beyond the caches (16
// sessions of ~290 tokens: ~85 MB of bf16 K/V over the 270M's 18 layers) and each key's row is visited once per pass.
constexpr int64_t ATTN_PREFETCH = 4;

template <int GH, typename T>
static void attend_row_fast(const float* q, int64_t D, const T* kb, const T* vb, int64_t ks, int64_t vs,
                            const int64_t* idx, int64_t len, float scale, float softcap, float* scores, float* out,
                            float* stats) {
  constexpr int64_t LINES = 64 / sizeof(T);  // elements per cache line
  for (int64_t j = 0; j < len; ++j) {
    const T* kr = kb + idx[j] * ks;
    if (j + ATTN_PREFETCH < len) {  // a later key's K row (for this loop) and V row (for the next) on their way
      const T* kp = kb + idx[j + ATTN_PREFETCH] * ks;
      const T* vp = vb + idx[j + ATTN_PREFETCH] * vs;
      for (int64_t d = 0; d < D; d += LINES) {
        _mm_prefetch(reinterpret_cast<const char*>(kp + d), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(vp + d), _MM_HINT_T1);
      }
    }
    __m512 acc[GH];
    for (int h = 0; h < GH; ++h) acc[h] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 kv = load16(kr + d);
      for (int h = 0; h < GH; ++h) acc[h] = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * D + d), kv, acc[h]);
    }
    for (int h = 0; h < GH; ++h) scores[h * len + j] = capped(hsum(acc[h]), scale, softcap);
  }
  softmax_rows(scores, GH, len, stats);
  for (int64_t d0 = 0; d0 < D; d0 += 64) {  // out[h, d0:d0+64] in 4 x GH registers over all keys
    __m512 o[GH][4];
    for (int h = 0; h < GH; ++h)
      for (int i = 0; i < 4; ++i) o[h][i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; ++j) {
      const T* vr = vb + idx[j] * vs + d0;
      const __m512 v0 = load16(vr), v1 = load16(vr + 16), v2 = load16(vr + 32), v3 = load16(vr + 48);
      for (int h = 0; h < GH; ++h) {
        const __m512 p = _mm512_set1_ps(scores[h * len + j]);
        o[h][0] = _mm512_fmadd_ps(p, v0, o[h][0]);
        o[h][1] = _mm512_fmadd_ps(p, v1, o[h][1]);
        o[h][2] = _mm512_fmadd_ps(p, v2, o[h][2]);
        o[h][3] = _mm512_fmadd_ps(p, v3, o[h][3]);
      }
    }
    for (int h = 0; h < GH; ++h)
      for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out + h * D + d0 + 16 * i, o[h][i]);
  }
}
#endif

template <typename T>
static void attend_row(const float* q, int64_t g, int64_t D, const T* kb, const T* vb, int64_t ks, int64_t vs,
                       const int64_t* idx, int64_t len, float scale, float softcap, float* scores, float* out,
                       float* stats) {
  // scores[h, j] = scale * q[h] . k[idx[j]]
  for (int64_t j = 0; j < len; ++j) {
    const T* kr = kb + idx[j] * ks;
    for (int64_t h = 0; h < g; ++h) {
      const float* qh = q + h * D;
      float s;
#ifdef __AVX512F__
      if (D % 16 == 0) {
        __m512 acc = _mm512_mul_ps(load16(qh), load16(kr));
        for (int64_t d = 16; d < D; d += 16) acc = _mm512_fmadd_ps(load16(qh + d), load16(kr + d), acc);
        s = hsum(acc);
      } else
#elif defined(AVX2_ONLY)
      if (D % 8 == 0) {
        __m256 acc = _mm256_mul_ps(load8(qh), load8(kr));
        for (int64_t d = 8; d < D; d += 8) acc = _mm256_fmadd_ps(load8(qh + d), load8(kr + d), acc);
        s = hsum8(acc);
      } else
#endif
      {
        s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += qh[d] * static_cast<float>(kr[d]);
      }
      scores[h * len + j] = capped(s, scale, softcap);
    }
  }
  softmax_rows(scores, g, len, stats);
  std::fill(out, out + g * D, 0.f);
  for (int64_t j = 0; j < len; ++j) {  // out[h] = sum_j p[h, j] * v[idx[j]]
    const T* vr = vb + idx[j] * vs;
    for (int64_t h = 0; h < g; ++h) {
      const float p = scores[h * len + j];
      float* oh = out + h * D;
#ifdef __AVX512F__
      if (D % 16 == 0) {
        const __m512 pv = _mm512_set1_ps(p);
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(oh + d, _mm512_fmadd_ps(pv, load16(vr + d), _mm512_loadu_ps(oh + d)));
        continue;
      }
#elif defined(AVX2_ONLY)
      if (D % 8 == 0) {
        const __m256 pv = _mm256_set1_ps(p);
        for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(oh + d, _mm256_fmadd_ps(pv, load8(vr + d), _mm256_loadu_ps(oh + d)));
        continue;
      }
#endif
      for (int64_t d = 0; d < D; ++d) oh[d] += p * static_cast<float>(vr[d]);
    }
  }
}

// A row's keys are attended in segments of ATTN_SEG, each segment a parallel task (flash-decoding): a single decode
// row (one kv head on the 270M) then uses every thread. Each segment leaves its unnormalised softmax (max, sum) and
// PV; they merge in order. The split depends only on the row's length, never on the batch, so a row's result is the
// same alone or batched; a row of at most ATTN_SEG keys is one segment, normalised directly as before.
constexpr int64_t ATTN_SEG = 128;

template <typename T>
static void attend_any(const float* q, int64_t g, int64_t D, const T* kr, const T* vr, int64_t ks, int64_t vs,
                       const int64_t* idx, int64_t len, float scale, float softcap, float* scores, float* out,
                       float* stats) {
#ifdef __AVX512F__
  if (D % 64 == 0 && (g == 1 || g == 2 || g == 4)) {
    if (g == 1) return attend_row_fast<1, T>(q, D, kr, vr, ks, vs, idx, len, scale, softcap, scores, out, stats);
    if (g == 2) return attend_row_fast<2, T>(q, D, kr, vr, ks, vs, idx, len, scale, softcap, scores, out, stats);
    return attend_row_fast<4, T>(q, D, kr, vr, ks, vs, idx, len, scale, softcap, scores, out, stats);
  }
#endif
  attend_row<T>(q, g, D, kr, vr, ks, vs, idx, len, scale, softcap, scores, out, stats);
}

template <typename T>
static void decode_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::vector<int64_t>& slots, int64_t L, const int64_t* lp, float scale,
                                  float softcap, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  const int64_t g = Hq / Hkv;
  const float* qp = q.data_ptr<float>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const int64_t ks = k.stride(0), kh = k.stride(1), vs = v.stride(0), vh = v.stride(1);
  // tasks: (row, kv head, segment); first[t] = the first task of (row, head) t
  std::vector<int64_t> first(B * Hkv + 1, 0);
  for (int64_t t = 0; t < B * Hkv; ++t) {
    const int64_t len = lp[t / Hkv];
    first[t + 1] = first[t] + (len <= ATTN_SEG ? 1 : (len + ATTN_SEG - 1) / ATTN_SEG);
  }
  const int64_t ntasks = first.back(), part_size = g * (D + 2);  // a segment's PV [g, D], then (max, sum) x g
  std::vector<float> part(ntasks > B * Hkv ? ntasks * part_size : 0);
  par_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(g * std::min<int64_t>(std::max<int64_t>(L, 1), ATTN_SEG));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1;
      const int64_t b = t / Hkv, h = t % Hkv, len = lp[b], seg = task - first[t];
      const int64_t off = (b * Hq + h * g) * D;
      if (len <= 0) {
        std::fill(op + off, op + off + g * D, 0.f);
        continue;
      }
      const int64_t* ir = slots.data() + b * L;
      if (len <= ATTN_SEG) {
        attend_any<T>(qp + off, g, D, kp + h * kh, vp + h * vh, ks, vs, ir, len, scale, softcap, scores.data(),
                      op + off, nullptr);
        continue;
      }
      float* pt = part.data() + task * part_size;
      const int64_t j0 = seg * ATTN_SEG;
      attend_any<T>(qp + off, g, D, kp + h * kh, vp + h * vh, ks, vs, ir + j0, std::min(ATTN_SEG, len - j0), scale,
                    softcap, scores.data(), pt, pt + g * D);
    }
  });
  if (part.empty()) return;
  par_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {  // merge the segments of split rows, in order
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = first[t + 1] - first[t];
      if (n == 1) continue;
      const int64_t b = t / Hkv, h = t % Hkv;
      float* o = op + (b * Hq + h * g) * D;
      for (int64_t hh = 0; hh < g; ++hh) {
        float mx = -INFINITY;
        for (int64_t s = 0; s < n; ++s) mx = std::max(mx, part[(first[t] + s) * part_size + g * D + 2 * hh]);
        float sum = 0.f;
        std::fill(o + hh * D, o + (hh + 1) * D, 0.f);
        for (int64_t s = 0; s < n; ++s) {
          const float* pt = part.data() + (first[t] + s) * part_size;
          const float w = std::exp(pt[g * D + 2 * hh] - mx);
          sum += pt[g * D + 2 * hh + 1] * w;
          for (int64_t d = 0; d < D; ++d) o[hh * D + d] += pt[hh * D + d] * w;
        }
        const float inv = 1.0f / sum;
        for (int64_t d = 0; d < D; ++d) o[hh * D + d] *= inv;
      }
    }
  });
}

// Row b's j-th visible key lives at slot table[b, (start[b] + j) / block] * page_stride + (start[b] + j) % block: a
// block table straight from the paged cache (block = tokens per page), or block = page_stride = 1 for a plain slot
// list (a dense cache passes its positions).
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table_in,
                            const at::Tensor& start_in, const at::Tensor& lengths_in, int64_t block, int64_t page_stride,
                            double scale, double softcap) {
  TORCH_CHECK(q_in.dim() == 3 && k.dim() == 3 && v.dim() == 3, "decode_attention: q [B, Hq, D], k/v [S, Hkv, D]");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat, "decode_attention: q must be float32");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "decode_attention: k and v must both be float32 or both bfloat16");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k.size(2) == q_in.size(2) && v.size(2) == q_in.size(2),
              "decode_attention: k/v rows must be contiguous with q's head_dim");
  TORCH_CHECK(k.size(1) == v.size(1) && k.size(1) > 0 && q_in.size(1) % k.size(1) == 0,
              "decode_attention: query heads must be a multiple of kv heads");
  TORCH_CHECK(block > 0 && page_stride > 0, "decode_attention: block and page_stride must be positive");
  const at::Tensor q = q_in.contiguous(), table = table_in.contiguous(), start = start_in.contiguous(),
                   lengths = lengths_in.contiguous();
  const int64_t B = q.size(0);
  TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 2 && table.size(0) == B,
              "decode_attention: table must be int64 [B, P]");
  TORCH_CHECK(start.scalar_type() == at::kLong && start.numel() == B && lengths.scalar_type() == at::kLong &&
              lengths.numel() == B, "decode_attention: start and lengths must be int64 [B]");
  const int64_t P = table.size(1), S = std::min(k.size(0), v.size(0));
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* sp = start.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  int64_t L = 0;
  for (int64_t b = 0; b < B; ++b) L = std::max(L, lp[b]);
  // every slot a row reads, computed and bounds-checked once (a bad table must not read foreign memory)
  std::vector<int64_t> slots(B * std::max<int64_t>(L, 1));
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sp[b] >= 0, "decode_attention: negative start");
    for (int64_t j = 0; j < lp[b]; ++j) {
      const int64_t pos = sp[b] + j, page = pos / block;
      TORCH_CHECK(page < P, "decode_attention: row ", b, " needs page ", page, " of a table of ", P);
      const int64_t slot = tp[b * P + page] * page_stride + pos % block;
      TORCH_CHECK(slot >= 0 && slot < S, "decode_attention: slot out of range");
      slots[b * L + j] = slot;
    }
  }
  at::Tensor out = at::empty_like(q);
  if (k.scalar_type() == at::kFloat)
    decode_attention_impl<float>(q, k, v, slots, L, lp, static_cast<float>(scale), static_cast<float>(softcap), out);
  else
    decode_attention_impl<at::BFloat16>(q, k, v, slots, L, lp, static_cast<float>(scale), static_cast<float>(softcap), out);
  return out;
}

}  // namespace
