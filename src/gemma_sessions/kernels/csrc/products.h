// The exact grouped-int8 product (qmatmul) and dequantize.
// Part of the kernels' one translation unit: ops.cpp includes every part, in order, and registers the ops.
#pragma once

#include "common.h"
#include "pool.h"
#include "codes.h"

namespace {

// qmatmul: x @ W^T for a weight held EXACTLY as int8 codes with per-group float32 scales (and offsets).
//
//   W[n, k] = scales[n, g] * codes[n, k] + offsets[n, g],   g = k / G
//   out[m, n] = sum_k x[m, k] * W[n, k]
//
// Each group's codes are multiplied with x as exact small integers and the scale (and offset, through x's group sum)
// applied once per group (dot_rows); each vector of codes is reused by a block of up to 8 rows of x. Float32
// accumulation throughout (the float32 mode's product, up to rounding: ~1e-7 relative); a row's result does not
// depend on the other rows. Parallel over N on the kernels' own thread pool (par_for; torch.set_num_threads sets its
// size). AVX-512 path under __AVX512F__, a portable loop otherwise.
// Registered as torch.ops.gemma_sessions.qmatmul (no pybind11: faster to JIT-compile).

#ifdef __AVX512F__
static inline __m512 load_codes16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Horizontal sums in registers (gcc 12's _mm512_reduce_add_ps goes through the stack: a store-forwarding stall
// per output). half8: 16 lanes -> 8 -> 4 partial sums.
static inline __m128 half4(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
}

static inline float hsum(__m512 v) { return hsum4(half4(v)); }

// MB rows of x (stride K) times one weight row n; writes MB dot products to dots. Per group g of G weights:
//   dot = sum_g scale_g * (sum_{k in g} x_k * code_k) + sum_g offset_g * xsum_g,   xsum_g = sum_{k in g} x_k
// (the codes are exact small integers in float32, so each group's inner sum is the product with the codes, and the
// scale and offset apply once per group instead of once per weight: ~25% fewer instructions per weight than
// dequantizing each vector of 16 first). xs holds xsum_g per row (MB x ng, row stride ng), or nullptr without
// offsets. Float32 throughout; a row's instruction sequence, hence its result, does not depend on MB or the other
// rows (batched == alone, bit for bit).
template <int MB, bool OFF, typename R>
static inline void dot_rows(const float* x, int64_t K, const R& row, const float* sc, int64_t G_arg,
                            const float* off, const float* xs, float* dots) {
  const int64_t G = R::kG > 0 ? R::kG : G_arg;
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t ng = K / G;
  for (int64_t g = 0; g < ng; ++g) {
    const auto cg = row.group(g);
    const float* xg = x + g * G;
    __m512 t[MB];
    __m512 w = cg.f16(0);
    for (int m = 0; m < MB; ++m) t[m] = _mm512_mul_ps(_mm512_loadu_ps(xg + m * K), w);
    for (int64_t k = 16; k < G; k += 16) {
      w = cg.f16(k);
      for (int m = 0; m < MB; ++m) t[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xg + m * K + k), w, t[m]);
    }
    const __m512 s = _mm512_set1_ps(sc[g]);
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(t[m], s, acc[m]);
  }
  if (OFF) {
    for (int64_t g = 0; g < ng; g += 16) {
      const __mmask16 k = ng - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (ng - g)) - 1);
      const __m512 o = _mm512_maskz_loadu_ps(k, off + g);
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(o, _mm512_maskz_loadu_ps(k, xs + m * ng + g), acc[m]);
    }
  }
  for (int m = 0; m < MB; ++m) dots[m] = hsum(acc[m]);
}

template <int MB, typename R>
static inline void dot_rows_any(const float* x, int64_t K, const R& row, const float* sc, int64_t G,
                                const float* off, const float* xs, float* dots) {
  if (off != nullptr) return dot_rows<MB, true>(x, K, row, sc, G, off, xs, dots);
  return dot_rows<MB, false>(x, K, row, sc, G, off, xs, dots);
}

#endif

// Portable: the same weights (code * scale + offset), scalar.
static inline void dot_rows_scalar(const float* x, int64_t mb, int64_t K, const int8_t* c, const float* sc,
                                   int64_t G, const float* off, float* dots) {
  for (int64_t m = 0; m < mb; ++m) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      float w = static_cast<float>(c[k]) * sc[k / G];
      if (off != nullptr) w += off[k / G];
      acc += x[m * K + k] * w;
    }
    dots[m] = acc;
  }
}

#ifdef AVX2_ONLY
static inline __m256 load_codes8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum8(__m256 v) {
  return hsum4(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
}

// dot_rows in 8 lanes (16 ymm registers: at most 4 rows a pass, each with an accumulator and two group sums). Same
// per-group form; the offsets' term is summed per row in order after the lanes. A row's result does not depend on MB.
// GT: the group size at compile time (32: Q8_0, Q4_K, Q5_K; 16: Q6_K), so a group's loop unrolls without branches;
// 0 for any other (G then from the argument).
template <int MB, int GT, typename R>
static inline void dot_rows8(const float* x, int64_t K, const R& row, const float* sc, int64_t G_arg,
                             const float* off, const float* xs, float* dots) {
  const int64_t G = GT > 0 ? GT : G_arg;
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  const int64_t ng = K / G;
  for (int64_t g = 0; g < ng; ++g) {
    const auto cg = row.group(g);
    const float* xg = x + g * G;
    // two chains per row (even and odd vectors of the group): half the dependent FMA latency per group
    __m256 t0[MB], t1[MB];
    __m256 w = cg.f8(0);
    for (int m = 0; m < MB; ++m) t0[m] = _mm256_mul_ps(_mm256_loadu_ps(xg + m * K), w);
    if (G >= 16) {
      w = cg.f8(8);
      for (int m = 0; m < MB; ++m) t1[m] = _mm256_mul_ps(_mm256_loadu_ps(xg + m * K + 8), w);
    }
    for (int64_t k = 16; k < G; k += 16) {
      w = cg.f8(k);
      for (int m = 0; m < MB; ++m) t0[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xg + m * K + k), w, t0[m]);
      if (k + 8 < G) {
        w = cg.f8(k + 8);
        for (int m = 0; m < MB; ++m) t1[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xg + m * K + k + 8), w, t1[m]);
      }
    }
    const __m256 s = _mm256_set1_ps(sc[g]);
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(G >= 16 ? _mm256_add_ps(t0[m], t1[m]) : t0[m], s, acc[m]);
  }
  for (int m = 0; m < MB; ++m) {
    float d = hsum8(acc[m]);
    if (off != nullptr) {
      for (int64_t g = 0; g < ng; ++g) d += off[g] * xs[m * ng + g];
    }
    dots[m] = d;
  }
}
#endif

// One weight row (read through R: int8 or packed codes, see codes.h) against mb rows of x.
template <typename R>
static inline void dot_block(const float* x, int64_t mb, int64_t K, const R& row, const float* sc, int64_t G,
                             const float* off, const float* xs, float* dots) {
#ifdef __AVX512F__
  if (G % 16 == 0) {
    return with_rows(mb, [&](auto rows) { dot_rows_any<decltype(rows)::value>(x, K, row, sc, G, off, xs, dots); });
  }
#endif
#ifdef AVX2_ONLY
  if (G % 8 == 0) {
    const int64_t ng = K / G;
    return row_passes<4, false>(mb, [&](auto rows, int64_t m0, int64_t) {
      constexpr int MR = decltype(rows)::value;
      const float* xsr = off != nullptr ? xs + m0 * ng : nullptr;
      if constexpr (R::kG > 0) {
        dot_rows8<MR, R::kG>(x + m0 * K, K, row, sc, G, off, xsr, dots + m0);
      } else {
        if (G == 32) return dot_rows8<MR, 32>(x + m0 * K, K, row, sc, G, off, xsr, dots + m0);
        if (G == 16) return dot_rows8<MR, 16>(x + m0 * K, K, row, sc, G, off, xsr, dots + m0);
        dot_rows8<MR, 0>(x + m0 * K, K, row, sc, G, off, xsr, dots + m0);
      }
    });
  }
#endif
  thread_local std::vector<int8_t> buf;  // packed rows' codes for the portable loop
  if (static_cast<int64_t>(buf.size()) < K) buf.resize(K);
  dot_rows_scalar(x, mb, K, row.scalar(buf.data(), K), sc, G, off, dots);
}

// Runs dot(n, m0, mb, dots) for n in [begin, end) (outer: a weight row stays in L1 across the row blocks) and row
// blocks of up to MB_MAX, and writes out [M, N] a tile of NT outputs at a time. Rows of out lie N floats apart (1 MiB
// on the LM head, a power of two): storing each dot straight to out would put every row's line in one L1 set.
constexpr int64_t NT = 64;

// rows_outer: each row block walks the tile's NT weight rows (which stay in L2 after the first block), instead of
// each weight row walking every row block (then x, 4 bytes per input, streams from L2 for every weight row once it
// outgrows L1); the same dots either way.
template <typename Dot>
static inline void tiled(int64_t M, int64_t N, int64_t begin, int64_t end, float* outp, Dot dot,
                         int64_t block = MB_MAX, bool rows_outer = false) {
  std::vector<float> tile(M * NT);
  float dots[MB_MAX];
  for (int64_t n0 = begin; n0 < end; n0 += NT) {
    const int64_t nt = std::min(NT, end - n0);
    auto one = [&](int64_t j, int64_t m0) {  // weight row n0 + j against the row block at m0
      const int64_t mb = std::min(block, M - m0);
      dot(n0 + j, m0, mb, dots);
      for (int64_t m = 0; m < mb; ++m) tile[(m0 + m) * NT + j] = dots[m];
    };
    if (rows_outer) {
      for (int64_t m0 = 0; m0 < M; m0 += block)
        for (int64_t j = 0; j < nt; ++j) one(j, m0);
    } else {
      for (int64_t j = 0; j < nt; ++j)
        for (int64_t m0 = 0; m0 < M; m0 += block) one(j, m0);
    }
    for (int64_t m = 0; m < M; ++m) std::copy(tile.data() + m * NT, tile.data() + m * NT + nt, outp + m * N + n0);
  }
}

// Weight rows ahead that qmatmul prefetches into L2 from 2 rows of x up: a decode step's weights stream from memory,
// and a thread that computes on them streamed below the bandwidth; the prefetch made the layers' products (and the
// head) faster at 4 and 8 rows. 1 row is unchanged (it streams at the bandwidth already), so there the hardware
// prefetcher is left alone.
constexpr int64_t QMM_PREFETCH = 32;

// qmatmul's checks of x, scales and offsets against N weight rows; the offsets' tensor (undefined: none).
static inline at::Tensor check_product(const char* op, const at::Tensor& x, const at::Tensor& scales,
                                       const c10::optional<at::Tensor>& offsets_in, int64_t N, int64_t G) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, op, ": x must be float32 [M, K]");
  const int64_t K = x.size(1);
  TORCH_CHECK(G > 0 && K % G == 0, op, ": group size ", G, " must divide K=", K);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 && scales.size(0) == N &&
              scales.size(1) == K / G, op, ": scales must be float32 [N, K/G]");
  if (!offsets_in.has_value() || !offsets_in->defined()) return at::Tensor();
  const at::Tensor& o = *offsets_in;
  TORCH_CHECK(o.scalar_type() == at::kFloat && o.dim() == 2 && o.size(0) == N && o.size(1) == K / G, op,
              ": offsets must be float32 [N, K/G]");
  return o.contiguous();
}

// The product over weight rows read through row(n) (codes.h), each row_bytes bytes from base (the prefetch).
template <typename Row>
static at::Tensor qmatmul_rows(const at::Tensor& x_in, int64_t N, const uint8_t* base, int64_t row_bytes,
                               const at::Tensor& scales_in, const at::Tensor& offsets, int64_t G, Row row) {
  const at::Tensor x = x_in.contiguous(), scales = scales_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), ng = K / G;
  const bool has_off = offsets.defined();
  const float* xp = x.data_ptr<float>();
  at::Tensor out = at::empty({M, N}, x.options());
  const float* sp = scales.data_ptr<float>();
  const float* op = has_off ? offsets.data_ptr<float>() : nullptr;
  float* outp = out.data_ptr<float>();
  // each row's group sums of x, for the offsets' term (see dot_rows), summed in order
  std::vector<float> xs(has_off ? M * ng : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(xs.size()); ++i) {
    float acc = 0.f;
    for (int64_t k = 0; k < G; ++k) acc += xp[(i / ng) * K + (i % ng) * G + k];
    xs[i] = acc;
  }
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K * ((M + MB_QMM - 1) / MB_QMM), 1));
  par_for(0, N, grain, [&](int64_t begin, int64_t end) {
    // NOTE: one weight row after another, even for M = 1. Interleaving four rows (four accumulator chains sharing
    // each x load) is faster on a cache-resident weight but slower in real decoding, where every weight streams
    // from memory once per token.
    tiled(M, N, begin, end, outp, [&](int64_t n, int64_t m0, int64_t mb, float* dots) {
      if (M >= 2 && m0 == 0 && n + QMM_PREFETCH < end) {  // a later weight row into L2 (see QMM_PREFETCH)
        const uint8_t* p = base + (n + QMM_PREFETCH) * row_bytes;
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(p + b, 0, 2);
        __builtin_prefetch(sp + (n + QMM_PREFETCH) * ng, 0, 2);
        if (has_off) __builtin_prefetch(op + (n + QMM_PREFETCH) * ng, 0, 2);
      }
      dot_block(xp + m0 * K, mb, K, row(n), sp + n * ng, G, has_off ? op + n * ng : nullptr,
                has_off ? xs.data() + m0 * ng : nullptr, dots);
    }, MB_QMM, ROWS_OUTER && M > MB_QMM);
  });
  return out;
}

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& codes_in, const at::Tensor& scales,
                   const c10::optional<at::Tensor>& offsets_in, int64_t G) {
  TORCH_CHECK(codes_in.dim() == 2 && codes_in.scalar_type() == at::kChar, "qmatmul: codes must be int8 [N, K]");
  TORCH_CHECK(x.dim() == 2, "qmatmul: x [M, K] must be 2-D");
  TORCH_CHECK(codes_in.size(1) == x.size(1), "qmatmul: x has K=", x.size(1), ", codes K=", codes_in.size(1));
  const int64_t N = codes_in.size(0), K = codes_in.size(1);
  const at::Tensor offsets = check_product("qmatmul", x, scales, offsets_in, N, G);
  const at::Tensor codes = codes_in.contiguous();
  const int8_t* cp = codes.data_ptr<int8_t>();
  return qmatmul_rows(x, N, reinterpret_cast<const uint8_t*>(cp), K, scales, offsets, G,
                      [=](int64_t n) { return I8Row{cp + n * K, G}; });
}

// qmatmul on packed codes (codes.h): each chunk unpacked in registers to the int8 codes qmatmul reads, then the same
// arithmetic in the same order: the same bits as qmatmul on the unpacked codes.
at::Tensor qmatmul_packed(const at::Tensor& x, const at::Tensor& packed_in, int64_t bits, int64_t bias,
                          const at::Tensor& scales, const c10::optional<at::Tensor>& offsets_in, int64_t G) {
  TORCH_CHECK(x.dim() == 2, "qmatmul_packed: x must be [M, K]");
  const int64_t K = x.size(1);
  check_packed("qmatmul_packed", packed_in, bits, bias, K, G);
  const int64_t N = packed_in.size(0), rb = packed_in.size(1);
  const at::Tensor offsets = check_product("qmatmul_packed", x, scales, offsets_in, N, G);
  const at::Tensor packed = packed_in.contiguous();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const int32_t b8 = static_cast<int32_t>(bias);
  return with_bits(bits, [&](auto b) {
    constexpr int BITS = decltype(b)::value;
    if (G == 16) {
      return qmatmul_rows(x, N, pp, rb, scales, offsets, G,
                          [=](int64_t n) { return PackedRow<BITS, 16>{pp + n * rb, b8}; });
    }
    return qmatmul_rows(x, N, pp, rb, scales, offsets, G,
                        [=](int64_t n) { return PackedRow<BITS, 32>{pp + n * rb, b8}; });
  });
}


// dequantize: rows [start, end) of W as float32, codes * scale then + offset (two roundings, as torch computes
// quant.dequantize_rows: the same bits; fp-contract off so the compiler does not fuse them). One pass on the kernels'
// pool: ~4x fewer memory passes than torch's convert, multiply and add (the float32 tiles of a prefill product).
__attribute__((optimize("fp-contract=off")))
static void dequant_range(const int8_t* c, const float* sc, const float* off, int64_t K, int64_t G, int64_t rows,
                          float* out) {
  const int64_t ng = K / G;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < ng; ++g) {
      const float s = sc[r * ng + g];
      const int8_t* cg = c + r * K + g * G;
      float* og = out + r * K + g * G;
      if (off != nullptr) {
        const float o = off[r * ng + g];
        for (int64_t k = 0; k < G; ++k) {
          const float w = static_cast<float>(cg[k]) * s;
          og[k] = w + o;
        }
      } else {
        for (int64_t k = 0; k < G; ++k) og[k] = static_cast<float>(cg[k]) * s;
      }
    }
  }
}

at::Tensor dequantize(const at::Tensor& codes_in, const at::Tensor& scales_in, const c10::optional<at::Tensor>& offsets_in,
                      int64_t G, int64_t start, int64_t end) {
  TORCH_CHECK(codes_in.dim() == 2 && codes_in.scalar_type() == at::kChar, "dequantize: codes must be int8 [N, K]");
  const int64_t N = codes_in.size(0), K = codes_in.size(1);
  TORCH_CHECK(G > 0 && K % G == 0, "dequantize: group size ", G, " must divide K=", K);
  TORCH_CHECK(0 <= start && start <= end && end <= N, "dequantize: rows [", start, ", ", end, ") outside [0, ", N, ")");
  const int64_t ng = K / G;
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.dim() == 2 && scales_in.size(0) == N &&
              scales_in.size(1) == ng, "dequantize: scales must be float32 [N, K/G]");
  const at::Tensor codes = codes_in.contiguous(), scales = scales_in.contiguous();
  at::Tensor offsets;
  const bool has_off = offsets_in.has_value() && offsets_in->defined();
  if (has_off) {
    offsets = offsets_in->contiguous();
    TORCH_CHECK(offsets.scalar_type() == at::kFloat && offsets.dim() == 2 && offsets.size(0) == N &&
                offsets.size(1) == ng, "dequantize: offsets must be float32 [N, K/G]");
  }
  at::Tensor out = at::empty({end - start, K}, scales.options());
  const int8_t* cp = codes.data_ptr<int8_t>() + start * K;
  const float* sp = scales.data_ptr<float>() + start * ng;
  const float* op = has_off ? offsets.data_ptr<float>() + start * ng : nullptr;
  float* outp = out.data_ptr<float>();
  par_for(0, end - start, std::max<int64_t>(1, 16384 / K), [&](int64_t b, int64_t e) {
    dequant_range(cp + b * K, sp + b * ng, op != nullptr ? op + b * ng : nullptr, K, G, e - b, outp + b * K);
  });
  return out;
}

}  // namespace
