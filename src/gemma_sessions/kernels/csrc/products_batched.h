// The batched products of AVX-512 builds: qmatmul_bf16 (AVX512-BF16), qmatmul_i16 (AVX512-VNNI, AMX tiles).
// Part of the kernels' one translation unit: ops.cpp includes every part, in order, and registers the ops.
#pragma once

#include "products.h"

namespace {

// qmatmul_bf16: the same product for MANY rows (the engine's batched decode), at twice the float32 rate: x and W
// rounded to bf16 (W as models/quant.py dequantizes it, then rounded: the very bf16 copy a bf16 GEMM would use, but
// never stored: the int8 codes are read), products summed in float32 by vdpbf16ps, float32 out (a bf16 GEMM would
// round the output too). Needs AVX512-BF16 and K % 32 == 0; bf16_dot_available() says whether this build has it.
#if defined(__AVX512F__) && defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;

static inline __m512 deq16(const int8_t* c, float s, float o, bool off) {
  __m512 w = _mm512_mul_ps(load_codes16(c), _mm512_set1_ps(s));
  return off ? _mm512_add_ps(w, _mm512_set1_ps(o)) : w;
}

template <int MB, bool OFF>
static inline void dot_rows_bf16(const at::BFloat16* xb, int64_t K, const int8_t* c, const float* sc, int64_t G,
                                 const float* off, float* dots) {
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  const at::BFloat16* xk = xb;  // x interleaved by 32 columns: [K/32][MB][32], one base pointer for all rows
  // group of column k: a shift for the power-of-two sizes of every GGUF type (an idiv per 32 columns was a
  // visible share of the time), a division otherwise
  const int sh = (G & (G - 1)) == 0 ? __builtin_ctzll(static_cast<unsigned long long>(G)) : -1;
  for (int64_t k = 0; k < K; k += 32, xk += MB * 32) {
    const int64_t g0 = sh >= 0 ? k >> sh : k / G, g1 = sh >= 0 ? (k + 16) >> sh : (k + 16) / G;
    const __m512 lo = deq16(c + k, sc[g0], OFF ? off[g0] : 0.f, OFF);
    const __m512 hi = deq16(c + k + 16, sc[g1], OFF ? off[g1] : 0.f, OFF);
    const __m512bh w = _mm512_cvtne2ps_pbh(hi, lo);  // k order: lo half from `lo`, as x below
    for (int m = 0; m < MB; ++m)
      acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(xk + m * 32), w);
  }
  for (int m = 0; m < MB; ++m) dots[m] = hsum(acc[m]);
}

template <int MB>
static inline void dot_bf16_any(const at::BFloat16* xb, int64_t K, const int8_t* c, const float* sc, int64_t G,
                                const float* off, float* dots) {
  if (off != nullptr) return dot_rows_bf16<MB, true>(xb, K, c, sc, G, off, dots);
  return dot_rows_bf16<MB, false>(xb, K, c, sc, G, off, dots);
}

static inline void dot_block_bf16(const at::BFloat16* xb, int64_t mb, int64_t K, const int8_t* c, const float* sc,
                                  int64_t G, const float* off, float* dots) {
  with_rows(mb, [&](auto rows) { dot_bf16_any<decltype(rows)::value>(xb, K, c, sc, G, off, dots); });
}
#else
constexpr bool kBf16Dot = false;
#endif

bool bf16_dot_available() { return kBf16Dot; }

at::Tensor qmatmul_bf16(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& scales_in,
                        const c10::optional<at::Tensor>& offsets_in, int64_t G) {
  TORCH_CHECK(kBf16Dot, "qmatmul_bf16: this build has no AVX512-BF16");
  TORCH_CHECK(x_in.dim() == 2 && codes_in.dim() == 2, "qmatmul_bf16: x [M, K] and codes [N, K] must be 2-D");
  TORCH_CHECK(codes_in.scalar_type() == at::kChar && scales_in.scalar_type() == at::kFloat,
              "qmatmul_bf16: int8 codes and float32 scales");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = codes_in.size(0);
  TORCH_CHECK(codes_in.size(1) == K, "qmatmul_bf16: x has K=", K, ", codes K=", codes_in.size(1));
  TORCH_CHECK(G > 0 && G % 16 == 0 && K % G == 0 && K % 32 == 0, "qmatmul_bf16: group size ", G, " and K=", K,
              " must be multiples of 16 and 32");
  const int64_t ng = K / G;
  TORCH_CHECK(scales_in.size(0) == N && scales_in.size(1) == ng, "qmatmul_bf16: scales must be [N, K/G]");
  const at::Tensor xb = x_in.to(at::kBFloat16).contiguous();  // round to nearest even, as a bf16 GEMM's input
  const at::Tensor codes = codes_in.contiguous(), scales = scales_in.contiguous();
  at::Tensor offsets;
  const bool has_off = offsets_in.has_value() && offsets_in->defined();
  if (has_off) {
    offsets = offsets_in->contiguous();
    TORCH_CHECK(offsets.scalar_type() == at::kFloat && offsets.size(0) == N && offsets.size(1) == ng,
                "qmatmul_bf16: offsets must be float32 [N, K/G]");
  }
  at::Tensor out = at::empty({M, N}, x_in.options().dtype(at::kFloat));
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  const at::BFloat16* xp = xb.data_ptr<at::BFloat16>();
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* op = has_off ? offsets.data_ptr<float>() : nullptr;
  float* outp = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K * ((M + MB_MAX - 1) / MB_MAX), 1));
  // rows per block: their bf16 inputs (block x K x 2 bytes) stay within ~24 KiB of L1 (16 rows at K = 640, 6 at 2048)
  const int64_t block = std::clamp<int64_t>(24576 / (2 * K), 4, MB_MAX);
  // x re-laid per block of rows as [K/32][rows][32] (dot_rows_bf16 then addresses every row from one pointer: with
  // 16 row pointers the compiler ran out of registers and spilled in the inner loop, slower)
  std::vector<at::BFloat16> xi(M * K);
  for (int64_t m0 = 0; m0 < M; m0 += block) {
    const int64_t mb = std::min(block, M - m0);
    for (int64_t m = 0; m < mb; ++m)
      for (int64_t k = 0; k < K; k += 32)
        std::copy(xp + (m0 + m) * K + k, xp + (m0 + m) * K + k + 32, xi.data() + m0 * K + (k / 32) * mb * 32 + m * 32);
  }
  const at::BFloat16* xip = xi.data();
  par_for(0, N, grain, [&](int64_t begin, int64_t end) {
    tiled(M, N, begin, end, outp, [&](int64_t n, int64_t m0, int64_t mb, float* dots) {
      dot_block_bf16(xip + m0 * K, mb, K, cp + n * K, sp + n * ng, G, has_off ? op + n * ng : nullptr, dots);
    }, block);
  });
#endif
  return out;
}

// qmatmul_i16: products of more rows than the exact kernel takes (the engine's batched decode, short prefill
// chunks; up to ~64 rows, where torch's bf16 GEMM starts to win) with int16 activations
// and the weights' own integer codes. x is rounded to int16 with one scale per row (s = max|x| / 32767: an error of
// at most max|x| / 65534 per element, where bf16 rounding errs by up to |x| / 512 per element), the codes are used
// as they are (bf16 rounding of the dequantized weights is gone), and AVX512-VNNI's vpdpwssd sums each group's
// int16 x int16 products exactly in int32 (32 products per instruction, as vdpbf16ps); per group, the sum times
// the group's scale is added in float32 (and offset * sum(x) for the types with offsets). Weights are re-laid once
// (i16_pack) with 16 outputs across a vector's lanes and 2 inputs per lane, vpdpwssd's layout, so no row sum across
// lanes is needed at the end (the bf16 kernel's per-output horizontal sums were a fifth of its instructions).
// Needs N % 16 == 0 and an even group size of at most 512 dividing K (so a lane's int32 sum of G products of
// |x| <= 32767 and |code| <= 128 cannot overflow).
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kI16 = true;
#else
constexpr bool kI16 = false;
#endif

bool i16_available() { return kI16; }

// AMX: the OS must grant a process the tile data state before its first tile instruction (Linux's
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA), once; false where the build or the kernel has no AMX.
bool amx_available() {
#ifdef HAVE_AMX
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
#else
  return false;
#endif
}

// The inputs one AMX instruction takes from a group: all G of them up to 64 (the tile's 64 bytes a row), else 64.
static inline int64_t amx_kt(int64_t G) { return G <= 64 ? G : 64; }
bool amx_group_ok(int64_t G) { return G % 4 == 0 && G <= 256 && G % amx_kt(G) == 0; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> i16_pack(const at::Tensor& codes_in, const at::Tensor& scales_in,
                                                        const c10::optional<at::Tensor>& offsets_in, int64_t G,
                                                        bool quads) {
  TORCH_CHECK(codes_in.dim() == 2 && codes_in.scalar_type() == at::kChar, "i16_pack: codes must be int8 [N, K]");
  const int64_t N = codes_in.size(0), K = codes_in.size(1);
  TORCH_CHECK(N % 16 == 0 && G > 0 && G <= 512 && G % 2 == 0 && K % G == 0, "i16_pack: N % 16 must be 0 and the ",
              "group size ", G, " even, at most 512 and a divisor of K=", K);
  const int64_t ng = K / G;
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.dim() == 2 && scales_in.size(0) == N &&
              scales_in.size(1) == ng, "i16_pack: scales must be float32 [N, K/G]");
  const bool has_off = offsets_in.has_value() && offsets_in->defined() && offsets_in->numel() > 0;
  if (has_off)
    TORCH_CHECK(offsets_in->scalar_type() == at::kFloat && offsets_in->sizes() == scales_in.sizes(),
                "i16_pack: offsets must be float32 [N, K/G]");
  TORCH_CHECK(!quads || (amx_available() && amx_group_ok(G)), "i16_pack: the AMX layout needs AMX and a group ",
              "that is a multiple of 4, at most 256, and at most 64 or a multiple of 64 (got ", G, ")");
  const at::Tensor codes = codes_in.contiguous(), scales = scales_in.contiguous();
  const at::Tensor offsets = has_off ? offsets_in->contiguous() : at::Tensor();
  const int64_t V = quads ? 4 : 2;  // inputs per output in a lane: AMX's int8 quads, or vpdpwssd's int16 pairs
  at::Tensor wq = at::empty({N / 16, K / V, 16, V}, codes.options());
  at::Tensor sw = at::empty({N / 16, ng, 16}, scales.options());
  at::Tensor ow = has_off ? at::empty({N / 16, ng, 16}, scales.options()) : at::empty({0}, scales.options());
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* op = has_off ? offsets.data_ptr<float>() : nullptr;
  int8_t* wp = wq.data_ptr<int8_t>();
  float* swp = sw.data_ptr<float>();
  float* owp = has_off ? ow.data_ptr<float>() : nullptr;
  par_for(0, N / 16, 16, [&](int64_t b, int64_t e) {
    for (int64_t nb = b; nb < e; ++nb)
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t n = nb * 16 + j;
        for (int64_t k = 0; k < K; ++k) wp[((nb * (K / V) + k / V) * 16 + j) * V + k % V] = cp[n * K + k];
        for (int64_t g = 0; g < ng; ++g) {
          swp[(nb * ng + g) * 16 + j] = sp[n * ng + g];
          if (has_off) owp[(nb * ng + g) * 16 + j] = op[n * ng + g];
        }
      }
  });
  return {wq, sw, ow};
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
// One row of x to int16: s = max|x| / 32767, q = round(x / s) to nearest even (as std::nearbyint). Returns false,
// with s = 0, when the row holds a NaN or an infinity (the caller writes NaN there).
static inline bool quantize_row_i16(const float* xr, int64_t K, int16_t* q, float* s_out) {
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  int64_t k = 0;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K % 16)) - 1);
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(xr + k);
    bad |= _mm512_fpclass_ps_mask(v, 0x99);  // QNaN, SNaN, +inf, -inf
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
  }
  if (k < K) {
    const __m512 v = _mm512_maskz_loadu_ps(tail, xr + k);
    bad |= _mm512_fpclass_ps_mask(v, 0x99);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
  }
  const float amax = bad ? 0.f : _mm512_reduce_max_ps(vmax);
  *s_out = amax / 32767.f;
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
  for (k = 0; k + 16 <= K; k += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k),
                        _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), inv))));
  if (k < K)
    _mm512_mask_cvtsepi32_storeu_epi16(q + k, tail,
                                       _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(tail, xr + k), inv)));
  return bad == 0;
}

constexpr int64_t I16_MB = 8;  // rows per pass: 8 int32 chains + 8 float accumulators + the weight vector

// MB rows of int16 x ([MB][K], one scale per row applied by the caller) against one block of 16 outputs.
template <int MB, bool OFF>
static inline void i16_block(const int8_t* wb, const float* sb, const float* ob, const int16_t* xq, int64_t K,
                             int64_t G, int64_t ng, const float* xs, __m512* out) {
  __m512 facc[MB];
  for (int r = 0; r < MB; ++r) facc[r] = _mm512_setzero_ps();
  const int64_t P = G / 2;
  for (int64_t g = 0; g < ng; ++g) {
    __m512i iacc[MB];
    for (int r = 0; r < MB; ++r) iacc[r] = _mm512_setzero_si512();
    const int8_t* wg = wb + g * P * 32;
    const int16_t* xg = xq + g * G;
    for (int64_t p = 0; p < P; ++p) {
      const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + p * 32)));
      for (int r = 0; r < MB; ++r) {
        int32_t xx;
        std::memcpy(&xx, xg + r * K + 2 * p, 4);
        iacc[r] = _mm512_dpwssd_epi32(iacc[r], w, _mm512_set1_epi32(xx));
      }
    }
    const __m512 s = _mm512_loadu_ps(sb + g * 16);
    for (int r = 0; r < MB; ++r) facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r]), s, facc[r]);
    if constexpr (OFF) {
      const __m512 o = _mm512_loadu_ps(ob + g * 16);
      for (int r = 0; r < MB; ++r) facc[r] = _mm512_fmadd_ps(o, _mm512_set1_ps(xs[r * ng + g]), facc[r]);
    }
  }
  for (int r = 0; r < MB; ++r) out[r] = facc[r];
}
#endif

#ifdef HAVE_AMX
// qmatmul_i16 on AMX: the SAME integer group sums as i16_block, from the int8 tile unit. Each int16 x is split as
// x = 256 * hi + lo (hi = x >> 8, signed int8; lo = x & 255, unsigned), and a group's sum is
// 256 * sum(hi * w) + sum(lo * w): tdpbssd (signed x signed) and tdpbusd (unsigned x signed) give the two int32
// sums for 16 rows x 16 outputs, exactly (|sum| < 2^31 for groups of at most 256). From there the float32 steps are
// i16_block's, in its order (sum times scale, offset times the row's group sum, row scale last), so the output is
// bit for bit the AVX-512 kernel's. Tiles: 0 and 1 the two sums, 2 and 3 hi and lo of 16 rows, 4 the codes of 16
// outputs ([kt/4][16][4]: i16_pack's quads). One tdpbssd does 16 x 16 x kt products where vpdpwssd does 32.
constexpr int64_t AMX_MR = 16;  // rows per tile
struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

static inline void amx_configure(int64_t kt) {
  AmxConfig c;
  for (int t = 0; t < 4; ++t) c.rows[t] = AMX_MR;
  c.colsb[0] = c.colsb[1] = 64;  // 16 int32 sums a row
  c.colsb[2] = c.colsb[3] = static_cast<uint16_t>(kt);
  c.rows[4] = static_cast<uint8_t>(kt / 4);
  c.colsb[4] = 64;
  _tile_loadconfig(&c);
}

// 16 rows of split x (hi, lo: [16][K], padded with zero rows) against one block of 16 outputs: facc[r] as
// i16_block's out[r] (before the row scale). Software-pipelined: group g's tile products and stores are issued before
// the vector steps of group g - 1 read theirs (two buffers), so the tile unit and the vector units overlap and no
// load waits on the store just issued (with one buffer the tiles barely beat the AVX-512 kernel).
template <bool OFF>
static inline void i16_amx_block(const int8_t* wb, const float* sb, const float* ob, const int8_t* xh,
                                 const uint8_t* xl, int64_t K, int64_t G, int64_t ng, const float* xs, __m512* facc,
                                 int32_t* buf) {
  const int64_t kt = amx_kt(G);
  for (int r = 0; r < AMX_MR; ++r) facc[r] = _mm512_setzero_ps();
  const auto scale = [&](int64_t g) {  // group g's float32 steps, from its buffer
    const int32_t* ch = buf + (g & 1) * 2 * AMX_MR * 16;
    const int32_t* cl = ch + AMX_MR * 16;
    const __m512 s = _mm512_loadu_ps(sb + g * 16);
    for (int r = 0; r < AMX_MR; ++r) {
      const __m512i hi = _mm512_load_si512(ch + r * 16), lo = _mm512_load_si512(cl + r * 16);
      const __m512i iacc = _mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo);
      facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc), s, facc[r]);
    }
    if constexpr (OFF) {
      const __m512 o = _mm512_loadu_ps(ob + g * 16);
      for (int r = 0; r < AMX_MR; ++r) facc[r] = _mm512_fmadd_ps(o, _mm512_set1_ps(xs[r * ng + g]), facc[r]);
    }
  };
  for (int64_t g = 0; g < ng; ++g) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t k0 = g * G; k0 < g * G + G; k0 += kt) {
      _tile_loadd(4, wb + k0 * 16, 64);  // quads k0/4 .. : 64 bytes each
      _tile_loadd(2, xh + k0, K);
      _tile_loadd(3, xl + k0, K);
      _tile_dpbssd(0, 2, 4);
      _tile_dpbusd(1, 3, 4);
    }
    int32_t* ch = buf + (g & 1) * 2 * AMX_MR * 16;
    _tile_stored(0, ch, 64);
    _tile_stored(1, ch + AMX_MR * 16, 64);
    if (g > 0) scale(g - 1);
  }
  scale(ng - 1);
}

// qmatmul_i16's products on AMX, over output blocks in parallel: x split into hi/lo rows padded to 16 (see above).
static void i16_amx(const int16_t* xq, int64_t M, int64_t K, int64_t G, int64_t ng, const int8_t* wp,
                    const float* swp, const float* owp, const float* xs, const float* sx, const char* finite,
                    float* outp, int64_t N, int64_t NB, int64_t grain) {
  const int64_t Mp = (M + AMX_MR - 1) / AMX_MR * AMX_MR;
  std::vector<int8_t> xh(Mp * K, 0);
  std::vector<uint8_t> xl(Mp * K, 0);
  std::vector<float> xsp(owp != nullptr ? Mp * ng : 0, 0.f);
  for (int64_t i = 0; i < M * K; ++i) {
    xh[i] = static_cast<int8_t>(xq[i] >> 8);
    xl[i] = static_cast<uint8_t>(xq[i] & 255);
  }
  if (owp != nullptr) std::copy(xs, xs + M * ng, xsp.begin());
  // Each job configures the tiles of its thread and releases them at the end: torch's own AMX GEMMs (oneDNN) on the
  // same threads read the tile state from the hardware (sttilecfg) before reusing a configuration, so neither side
  // relies on what the other left.
  par_for(0, NB, grain, [&](int64_t begin, int64_t end) {
    amx_configure(amx_kt(G));
    alignas(64) int32_t buf[2 * 2 * AMX_MR * 16];  // two groups' hi and lo sums
    __m512 facc[AMX_MR];
    for (int64_t nb = begin; nb < end; ++nb) {
      const int8_t* wb = wp + nb * 16 * K;
      for (int64_t m0 = 0; m0 < M; m0 += AMX_MR) {
        if (owp != nullptr)
          i16_amx_block<true>(wb, swp + nb * ng * 16, owp + nb * ng * 16, xh.data() + m0 * K, xl.data() + m0 * K, K,
                              G, ng, xsp.data() + m0 * ng, facc, buf);
        else
          i16_amx_block<false>(wb, swp + nb * ng * 16, nullptr, xh.data() + m0 * K, xl.data() + m0 * K, K, G, ng,
                               nullptr, facc, buf);
        for (int64_t r = 0; r < std::min(AMX_MR, M - m0); ++r) {
          const int64_t m = m0 + r;
          const __m512 v = finite[m] ? _mm512_mul_ps(facc[r], _mm512_set1_ps(sx[m])) : _mm512_set1_ps(NAN);
          _mm512_storeu_ps(outp + m * N + nb * 16, v);
        }
      }
    }
    _tile_release();
  });
}
#endif

at::Tensor qmatmul_i16(const at::Tensor& x_in, const at::Tensor& wq, const at::Tensor& sw, const at::Tensor& ow,
                       int64_t G) {
  TORCH_CHECK(kI16, "qmatmul_i16: this build has no AVX512-VNNI");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "qmatmul_i16: x must be float32 [M, K]");
  const int64_t M = x_in.size(0), K = x_in.size(1);
  const bool quads = wq.dim() == 4 && wq.size(3) == 4;  // i16_pack's AMX layout
  TORCH_CHECK(wq.dim() == 4 && wq.scalar_type() == at::kChar && wq.size(1) * wq.size(3) == K && wq.size(2) == 16 &&
              (wq.size(3) == 2 || quads) && wq.is_contiguous(),
              "qmatmul_i16: packed codes must be [N/16, K/2, 16, 2] or [N/16, K/4, 16, 4] (i16_pack)");
  TORCH_CHECK(G > 0 && G <= 512 && G % 2 == 0 && K % G == 0, "qmatmul_i16: group size ", G,
              " must be even, at most 512 and divide K=", K);
  TORCH_CHECK(!quads || (amx_available() && amx_group_ok(G)), "qmatmul_i16: the AMX layout needs AMX and a group ",
              "that fits it (got ", G, ")");
  const int64_t NB = wq.size(0), N = NB * 16, ng = K / G;
  TORCH_CHECK(sw.scalar_type() == at::kFloat && sw.numel() == NB * ng * 16 && sw.is_contiguous(),
              "qmatmul_i16: packed scales do not match the codes (i16_pack)");
  const bool has_off = ow.defined() && ow.numel() > 0;
  TORCH_CHECK(!has_off || (ow.scalar_type() == at::kFloat && ow.numel() == sw.numel() && ow.is_contiguous()),
              "qmatmul_i16: packed offsets do not match the scales (i16_pack)");
  at::Tensor out = at::empty({M, N}, x_in.options());
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const at::Tensor x = x_in.contiguous();
  const float* xp = x.data_ptr<float>();
  std::vector<int16_t> xq(M * K);
  std::vector<float> sx(M), xs(has_off ? M * ng : 0);
  std::vector<char> finite(M, 1);
  par_for(0, M, std::max<int64_t>(1, 8192 / K), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* xr = xp + m * K;
      finite[m] = quantize_row_i16(xr, K, xq.data() + m * K, &sx[m]);
      for (int64_t g = 0; g < static_cast<int64_t>(has_off ? ng : 0); ++g) {
        float acc = 0.f;
        for (int64_t k = g * G; k < g * G + G; ++k) acc += xr[k];
        xs[m * ng + g] = sx[m] > 0.f ? acc / sx[m] : 0.f;  // in units of s: the caller multiplies by s
      }
    }
  });
  const int8_t* wp = wq.data_ptr<int8_t>();
  const float* swp = sw.data_ptr<float>();
  const float* owp = has_off ? ow.data_ptr<float>() : nullptr;
  float* outp = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K * std::max<int64_t>(M, 1), 1));
#ifdef HAVE_AMX
  if (quads) {
    i16_amx(xq.data(), M, K, G, ng, wp, swp, owp, xs.data(), sx.data(), finite.data(), outp, N, NB, grain);
    return out;
  }
#endif
  par_for(0, NB, grain, [&](int64_t begin, int64_t end) {
    __m512 acc[I16_MB];
    for (int64_t nb = begin; nb < end; ++nb) {
      const int8_t* wb = wp + nb * 16 * K;
      row_passes<I16_MB, true>(M, [&](auto rows, int64_t m0, int64_t mb) {
        constexpr int R = decltype(rows)::value;
        if (has_off)
          i16_block<R, true>(wb, swp + nb * ng * 16, owp + nb * ng * 16, xq.data() + m0 * K, K, G, ng,
                             xs.data() + m0 * ng, acc);
        else
          i16_block<R, false>(wb, swp + nb * ng * 16, nullptr, xq.data() + m0 * K, K, G, ng, nullptr, acc);
        for (int64_t r = 0; r < mb; ++r) {
          const int64_t m = m0 + r;
          const __m512 v = finite[m] ? _mm512_mul_ps(acc[r], _mm512_set1_ps(sx[m])) : _mm512_set1_ps(NAN);
          _mm512_storeu_ps(outp + m * N + nb * 16, v);
        }
      });
    }
  });
#endif
  return out;
}

}  // namespace
