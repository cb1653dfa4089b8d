// qmatmul_wide: the many-row float32 product of AVX2 builds (a GEMM tile).
// Part of the kernels' one translation unit: ops.cpp includes every part, in order, and registers the ops.
#pragma once

#include "products.h"

namespace {

// ------------------------------------------------------------------------------------------------ qmatmul_wide
// x @ W^T for many rows on AVX2 (no AVX-512): the register tile of a GEMM, lanes along the rows of x. Each output is
// one float32 FMA chain in the order of k over the dequantized weight, W[n, k] = fma(codes, scale, offset) rounded
// once to float32 (exact for GGUF blocks, see quant.py):
//
//   out[m, n] = fma(x[m, K-1], W[n, K-1], ... fma(x[m, 1], W[n, 1], x[m, 0] * W[n, 0]))
//
// whatever M, the row's place in the batch and the thread: a row's bits do not depend on the others (not the bits of
// qmatmul, whose lanes run along k). Up to WIDE_GEMM_MIN_ROWS rows (the small-batch loop) x is laid out transposed
// ([K][mc], padded to 8 lanes); per thread WIDE_NR weight rows at a time are dequantized into a float32 buffer and
// 16 (then 8) rows run a tile of WIDE_NR x 2 (x 1) vectors: per k two loads of x, WIDE_NR broadcasts of W, 12 FMAs
// (15 of the 16 ymm registers). More rows run wide_gemm (below).
#ifdef AVX2_ONLY
constexpr bool kWide = true;
constexpr int WIDE_NR = 6;
constexpr int64_t WIDE_NT = 48;  // outputs per tile of the result (a multiple of WIDE_NR; see tiled's NT)
constexpr int64_t WIDE_PREFETCH = 2 * WIDE_NR;  // weight rows ahead that a block prefetches

template <int NR, int MV>
static inline void wide_tile(const float* xt, int64_t mc, int64_t K, const float* wb, float* res) {
  __m256 acc[NR][MV];
  for (int j = 0; j < NR; ++j)
    for (int v = 0; v < MV; ++v) acc[j][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    const float* wk = wb + k * NR;  // the NR rows' 8 weights at k (see wide_dequant)
    for (int kk = 0; kk < 8; ++kk) {
      __m256 xv[MV];
      for (int v = 0; v < MV; ++v) xv[v] = _mm256_loadu_ps(xt + (k + kk) * mc + 8 * v);
      for (int j = 0; j < NR; ++j) {
        const __m256 b = _mm256_broadcast_ss(wk + j * 8 + kk);
        for (int v = 0; v < MV; ++v) acc[j][v] = _mm256_fmadd_ps(xv[v], b, acc[j][v]);
      }
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int v = 0; v < MV; ++v) _mm256_storeu_ps(res + j * 8 * MV + 8 * v, acc[j][v]);
}

// W's rows [n, n + nr) as float32 into wb, codes * scale (+ offset) per group, in blocks of 8 inputs: the nr rows'
// weights k..k+7 lie together at wb[k nr .. (k + 8) nr) (row j's at + 8 j), so a tile's broadcasts read one stream.
// 16 codes per load where the group allows (Q8_0, Q4_K, Q5_K: 32; Q6_K: 16): faster than 8 per load.
static inline void wide_dequant(const int8_t* c, const float* sc, const float* off, int64_t K, int64_t G, int64_t nr,
                                float* wb) {
  const int64_t ng = K / G;
  for (int64_t j = 0; j < nr; ++j) {
    const int8_t* cj = c + j * K;
    for (int64_t g = 0; g < ng; ++g) {
      const __m256 s = _mm256_set1_ps(sc[j * ng + g]);
      const __m256 o = _mm256_set1_ps(off != nullptr ? off[j * ng + g] : 0.f);
      const auto put = [&](int64_t k, __m256 codes) {  // one rounding (as mul then add for GGUF blocks: exact)
        _mm256_storeu_ps(wb + k * nr + j * 8, off != nullptr ? _mm256_fmadd_ps(codes, s, o) : _mm256_mul_ps(codes, s));
      };
      int64_t k = g * G;
      for (; k + 16 <= (g + 1) * G; k += 16) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cj + k));
        put(k, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)));
        put(k + 8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8))));
      }
      if (k < (g + 1) * G) put(k, load_codes8(cj + k));
    }
  }
}

template <int NR>
static inline void wide_rows(const float* xt, int64_t mc, int64_t mrows, int64_t K, const float* wb, float* tile,
                             int64_t j0) {
  alignas(32) float res[NR * 16];
  for (int64_t m0 = 0; m0 < mrows; m0 += 16) {
    const int64_t mb = std::min<int64_t>(16, mrows - m0);
    const int mv = mb > 8 ? 2 : 1;
    if (mv == 2) wide_tile<NR, 2>(xt + m0, mc, K, wb, res);
    else wide_tile<NR, 1>(xt + m0, mc, K, wb, res);
    for (int j = 0; j < NR; ++j)
      for (int64_t l = 0; l < mb; ++l) tile[(m0 + l) * WIDE_NT + j0 + j] = res[j * 8 * mv + l];
  }
}

// qmatmul_wide beyond WIDE_GEMM_MIN_ROWS rows (prompts): the roles swap, as in a BLIS GEMM. 16 weight rows are
// dequantized once per call into a panel [K][16] (L2), x is packed once into panels of 6 rows [K][6], and every
// panel runs a 6 x 16 register tile: per k two loads of W, six broadcasts of x, 12 FMAs. Each output is still
// fma(x[m, k], W[n, k], acc) in the order of k from acc = 0 with the same W (wide_dequant's arithmetic), so a row's
// bits are those of the small-batch loop. That loop, run over chunks of 64 rows of x (re-dequantizing its 6 weight
// rows per chunk), was slower on a prompt's rows than torch's float32 GEMM over dequantized tiles, which this
// replaces for prompts (and beats). From 17 rows (a batched decode step, a short prompt) this runs instead of the
// small-batch loop: faster at 24 and 48 rows, about level at 32; at 12 and 16 rows they are level (the small-batch
// loop kept). K is a multiple of 8 (G is, and divides K): gemm_dequant's blocks of 8 inputs.
constexpr int64_t WIDE_GEMM_MIN_ROWS = 16;
constexpr int GEMM_MR = 6;

static inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// W's rows [n, n + nr) (nr <= 16) as float32 into b [K][16], rows past nr zero: wide_dequant's arithmetic, 8 rows x
// 8 inputs at a time through a register transpose.
static inline void gemm_dequant(const int8_t* c, const float* sc, const float* off, int64_t K, int64_t G, int64_t nr,
                                float* b) {
  const int64_t ng = K / G;
  for (int64_t jb = 0; jb < 16; jb += 8) {
    for (int64_t k = 0; k < K; k += 8) {
      __m256 r[8];
      const int64_t g = k / G;
      for (int64_t j = 0; j < 8; ++j) {
        const int64_t row = jb + j;
        if (row >= nr) {
          r[j] = _mm256_setzero_ps();
          continue;
        }
        const __m256 codes = load_codes8(c + row * K + k);
        const __m256 s = _mm256_set1_ps(sc[row * ng + g]);
        r[j] = off != nullptr ? _mm256_fmadd_ps(codes, s, _mm256_set1_ps(off[row * ng + g])) : _mm256_mul_ps(codes, s);
      }
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(b + (k + i) * 16 + jb, r[i]);
    }
  }
}

// One panel of 6 rows against 16 weight rows over kn inputs (a: [kn][6], b: [kn][16]) into res [6][16] (row stride
// ldr), from zero or (a later block of k) continuing the sums in res: stored and reloaded float32, the same chain.
static inline void gemm_tile(const float* a, const float* b, int64_t kn, float* res, int64_t ldr, bool first) {
  __m256 acc[GEMM_MR][2];
  for (int r = 0; r < GEMM_MR; ++r) {
    acc[r][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(res + r * ldr);
    acc[r][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(res + r * ldr + 8);
  }
  for (int64_t k = 0; k < kn; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * 16), b1 = _mm256_loadu_ps(b + k * 16 + 8);
    for (int r = 0; r < GEMM_MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + k * GEMM_MR + r);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < GEMM_MR; ++r) {
    _mm256_storeu_ps(res + r * ldr, acc[r][0]);
    _mm256_storeu_ps(res + r * ldr + 8, acc[r][1]);
  }
}

// Inputs per block of k: all of K up to 1024 (the 270M's 640 and 1024), else 512, so a panel's slice of x (12 KB)
// and of W (32 KB) stay near L1: faster than unblocked at K = 2048, while blocks of 320 at K = 640 were slower.
static inline int64_t gemm_kc(int64_t K) { return K <= 1024 ? K : 512; }

template <typename Codes>
static void wide_gemm(const float* xp, int64_t M, int64_t K, const Codes& codes, const float* sp, const float* op,
                      int64_t N, int64_t G, float* outp) {
  const int64_t np = (M + GEMM_MR - 1) / GEMM_MR;
  std::vector<float> xa(np * GEMM_MR * K);  // panel p: rows [6 p, 6 p + 6) as [K][6], rows past M zero
  par_for(0, np, 8, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* dst = xa.data() + p * GEMM_MR * K;
      for (int r = 0; r < GEMM_MR; ++r) {
        const int64_t m = p * GEMM_MR + r;
        if (m < M) {
          const float* src = xp + m * K;
          for (int64_t k = 0; k < K; ++k) dst[k * GEMM_MR + r] = src[k];
        } else {
          for (int64_t k = 0; k < K; ++k) dst[k * GEMM_MR + r] = 0.f;
        }
      }
    }
  });
  const int64_t ng = K / G, nb = (N + 15) / 16, kc = gemm_kc(K);
  par_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> b_store(K * 16 + 16);
    float* const b = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(b_store.data()) + 63) & ~uintptr_t{63});
    alignas(32) float res[GEMM_MR * 16];
    std::vector<int8_t> staging(codes.staging(16, K));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk * 16, nr = std::min<int64_t>(16, N - n);
      gemm_dequant(codes.rows(n, nr, staging.data()), sp + n * ng, op != nullptr ? op + n * ng : nullptr, K, G, nr, b);
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t kn = std::min(kc, K - k0);
        for (int64_t p = 0; p < np; ++p) {
          const int64_t m0 = p * GEMM_MR, mr = std::min<int64_t>(GEMM_MR, M - m0);
          const float* a = xa.data() + p * GEMM_MR * K;
          if (mr == GEMM_MR && nr == 16) {
            gemm_tile(a + k0 * GEMM_MR, b + k0 * 16, kn, outp + m0 * N + n, N, k0 == 0);
          } else if (k0 == 0) {  // an edge tile: all of k at once, then its valid part
            gemm_tile(a, b, K, res, 16, true);
            for (int64_t r = 0; r < mr; ++r) std::copy(res + r * 16, res + r * 16 + nr, outp + (m0 + r) * N + n);
          }
        }
      }
    }
  });
}
#else
constexpr bool kWide = false;
#endif

bool wide_available() { return kWide; }


// The weight rows qmatmul_wide reads: int8 codes in place, or packed codes (codes.h) unpacked a block of rows at a
// time into an int8 staging buffer that stays in L1 (the block is dequantized to float32 next anyway): the same int8
// codes, hence the same bits.
struct WideI8 {
  const int8_t* c;
  int64_t K;
  int64_t staging(int64_t, int64_t) const { return 0; }
  const int8_t* rows(int64_t n, int64_t, int8_t*) const { return c + n * K; }
  const uint8_t* bytes(int64_t n) const { return reinterpret_cast<const uint8_t*>(c + n * K); }
  int64_t row_bytes() const { return K; }
};

template <int BITS>
struct WidePacked {
  const uint8_t* p;
  int64_t K, rb;
  int8_t bias;
  int64_t staging(int64_t rows, int64_t k) const { return rows * k; }
  const int8_t* rows(int64_t n, int64_t nr, int8_t* buf) const {
    unpack_rows<BITS>(p + n * rb, nr, K, bias, buf);
    return buf;
  }
  const uint8_t* bytes(int64_t n) const { return p + n * rb; }
  int64_t row_bytes() const { return rb; }
};

#ifdef AVX2_ONLY
// Up to WIDE_GEMM_MIN_ROWS rows: x transposed, [K][mc] with mc its row count rounded up to 8; per thread WIDE_NR
// weight rows at a time dequantized (wide_dequant) and run against every row (wide_rows).
template <typename Codes>
static void wide_small(const float* xp, int64_t M, int64_t K, const Codes& codes, const float* sp, const float* op,
                       int64_t N, int64_t G, float* outp) {
  const int64_t mc = (M + 7) / 8 * 8, ng = K / G, rb = codes.row_bytes();
  std::vector<float> xt(mc * K, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xt[k * mc + m] = xp[m * K + k];
  par_for(0, N, WIDE_NT, [&](int64_t begin, int64_t end) {
    std::vector<float> wb_store(WIDE_NR * K + 16);  // wb 64-byte aligned: no store splits a cache line
    float* const wbp = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(wb_store.data()) + 63) & ~uintptr_t{63});
    std::vector<float> tile(M * WIDE_NT);
    std::vector<int8_t> staging(codes.staging(WIDE_NR, K));
    for (int64_t n0 = begin; n0 < end; n0 += WIDE_NT) {
      const int64_t nt = std::min(WIDE_NT, end - n0);
      for (int64_t j0 = 0; j0 < nt; j0 += WIDE_NR) {
        const int64_t nr = std::min<int64_t>(WIDE_NR, nt - j0), n = n0 + j0;
        wide_dequant(codes.rows(n, nr, staging.data()), sp + n * ng, op != nullptr ? op + n * ng : nullptr, K, G,
                     nr, wbp);
        if (n + WIDE_PREFETCH + WIDE_NR <= end) {  // a later block's weights into L2 while this one computes
          const uint8_t* pc = codes.bytes(n + WIDE_PREFETCH);
          for (int64_t b = 0; b < WIDE_NR * rb; b += 64) __builtin_prefetch(pc + b, 0, 2);
          for (int64_t b = 0; b < WIDE_NR * ng; b += 16) {
            __builtin_prefetch(sp + (n + WIDE_PREFETCH) * ng + b, 0, 2);
            if (op != nullptr) __builtin_prefetch(op + (n + WIDE_PREFETCH) * ng + b, 0, 2);
          }
        }
        switch (nr) {
          case 1: wide_rows<1>(xt.data(), mc, M, K, wbp, tile.data(), j0); break;
          case 2: wide_rows<2>(xt.data(), mc, M, K, wbp, tile.data(), j0); break;
          case 3: wide_rows<3>(xt.data(), mc, M, K, wbp, tile.data(), j0); break;
          case 4: wide_rows<4>(xt.data(), mc, M, K, wbp, tile.data(), j0); break;
          case 5: wide_rows<5>(xt.data(), mc, M, K, wbp, tile.data(), j0); break;
          default: wide_rows<6>(xt.data(), mc, M, K, wbp, tile.data(), j0); break;
        }
      }
      for (int64_t m = 0; m < M; ++m)
        std::copy(tile.data() + m * WIDE_NT, tile.data() + m * WIDE_NT + nt, outp + m * N + n0);
    }
  });
}
#endif

template <typename Codes>
static at::Tensor wide_product(const at::Tensor& x_in, const Codes& codes, int64_t N, const at::Tensor& scales_in,
                               const at::Tensor& offsets, int64_t G) {
  const at::Tensor x = x_in.contiguous(), scales = scales_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
#ifdef AVX2_ONLY
  const float* op = offsets.defined() ? offsets.data_ptr<float>() : nullptr;
  if (M > WIDE_GEMM_MIN_ROWS) {
    wide_gemm(x.data_ptr<float>(), M, K, codes, scales.data_ptr<float>(), op, N, G, out.data_ptr<float>());
  } else {
    wide_small(x.data_ptr<float>(), M, K, codes, scales.data_ptr<float>(), op, N, G, out.data_ptr<float>());
  }
#endif
  return out;
}

at::Tensor qmatmul_wide(const at::Tensor& x, const at::Tensor& codes_in, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& offsets_in, int64_t G) {
  TORCH_CHECK(kWide, "qmatmul_wide: this build has no AVX2-only path");
  TORCH_CHECK(codes_in.dim() == 2 && codes_in.scalar_type() == at::kChar, "qmatmul_wide: codes must be int8 [N, K]");
  TORCH_CHECK(x.dim() == 2, "qmatmul_wide: x [M, K] must be 2-D");
  TORCH_CHECK(codes_in.size(1) == x.size(1), "qmatmul_wide: x has K=", x.size(1), ", codes K=", codes_in.size(1));
  TORCH_CHECK(G > 0 && G % 8 == 0, "qmatmul_wide: group size ", G, " must be a multiple of 8");
  const int64_t N = codes_in.size(0), K = codes_in.size(1);
  const at::Tensor offsets = check_product("qmatmul_wide", x, scales, offsets_in, N, G);
  const at::Tensor codes = codes_in.contiguous();
  return wide_product(x, WideI8{codes.data_ptr<int8_t>(), K}, N, scales, offsets, G);
}

at::Tensor qmatmul_wide_packed(const at::Tensor& x, const at::Tensor& packed_in, int64_t bits, int64_t bias,
                               const at::Tensor& scales, const c10::optional<at::Tensor>& offsets_in, int64_t G) {
  TORCH_CHECK(kWide, "qmatmul_wide_packed: this build has no AVX2-only path");
  TORCH_CHECK(x.dim() == 2, "qmatmul_wide_packed: x must be [M, K]");
  const int64_t K = x.size(1);
  check_packed("qmatmul_wide_packed", packed_in, bits, bias, K, G);
  const int64_t N = packed_in.size(0);
  const at::Tensor offsets = check_product("qmatmul_wide_packed", x, scales, offsets_in, N, G);
  const at::Tensor packed = packed_in.contiguous();
  return with_bits(bits, [&](auto b) {
    const WidePacked<decltype(b)::value> codes{packed.data_ptr<uint8_t>(), K, packed.size(1), static_cast<int8_t>(bias)};
    return wide_product(x, codes, N, scales, offsets, G);
  });
}

}  // namespace
