// How the products read a weight row's codes: int8 (one byte each), or packed at the width the GGUF file stores them
// (4, 5 or 6 bits) and unpacked in registers to the same int8 values, so a product computes the same bits from
// either. Part of the kernels' one translation unit: ops.cpp includes every part, in order, and registers the ops.
#pragma once

#include "common.h"
#include "pool.h"

namespace {

// ------------------------------------------------------------------------------------------------ the packed layout
// Written by pack_codes below (kernels/packed.py has its torch reference). Per weight row, per chunk of 32 inputs, 16 + 4 (BITS - 4) bytes, where
// u = code + bias (mod 256) < 2^BITS and the code is u - bias as int8:
//
//   bytes  0..15   u[j] & 15  |  (u[j + 16] & 15) << 4     (j = 0..15: the GGUF nibble order)
//   bytes 16..19   bit i = bit 4 of u[i]                    (BITS >= 5; a little-endian uint32, as Q5_0's qh)
//   bytes 20..23   bit i = bit 5 of u[i]                    (BITS == 6)
//
// The exact kernel unpacks in registers to the int8 codes' int32 / float32 lanes (AVX2: 8 codes at a time, see
// PackedRow; AVX-512: a chunk to 32 bytes, unpack32, then 16 at a time) and then runs exactly what it runs on int8
// codes; qmatmul_wide and unpack_codes unpack whole rows (unpack_rows). Groups are 16 or 32 inputs (every GGUF type
// narrower than 8 bits), so a group is a chunk or half of one.
constexpr int64_t PACK_CHUNK = 32;
static inline int64_t pack_chunk_bytes(int64_t bits) { return 16 + 4 * (bits - 4); }

// Portable: the row's K codes into out (the scalar loop's source, and unpack_codes off AVX2).
template <int BITS>
static inline void unpack_row_scalar(const uint8_t* p, int64_t K, int8_t bias, int8_t* out) {
  constexpr int64_t CB = 16 + 4 * (BITS - 4);
  for (int64_t c = 0; c < K / PACK_CHUNK; ++c, p += CB, out += PACK_CHUNK) {
    uint32_t h4 = 0, h5 = 0;
    if (BITS >= 5) std::memcpy(&h4, p + 16, 4);
    if (BITS == 6) std::memcpy(&h5, p + 20, 4);
    for (int i = 0; i < 32; ++i) {
      uint32_t u = (i < 16 ? p[i] : p[i - 16] >> 4) & 15u;
      u |= ((h4 >> i) & 1u) << 4 | ((h5 >> i) & 1u) << 5;
      out[i] = static_cast<int8_t>(static_cast<uint8_t>(u - static_cast<uint8_t>(bias)));
    }
  }
}

#if defined(__AVX2__)
// 0xFF in byte i where bit i of b is set (32 bits: byte i takes byte i / 8 of b, then one bit per byte position).
static inline __m256i bit_bytes32(uint32_t b) {
  const __m256i shuf = _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202,
                                          0x0303030303030303);
  const __m256i t = _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(b)), shuf),
                                    _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(t, _mm256_set1_epi64x(-1));
}

// The same for 16 bits.
static inline __m128i bit_bytes16(uint32_t b) {
  const __m128i shuf = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m128i t = _mm_or_si128(_mm_shuffle_epi8(_mm_set1_epi16(static_cast<int16_t>(b)), shuf),
                                 _mm_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm_cmpeq_epi8(t, _mm_set1_epi64x(-1));
}

// A chunk's 32 codes: inputs 0..15 in the low 128 bits, 16..31 in the high.
template <int BITS>
static inline __m256i unpack32(const uint8_t* p, __m256i bias) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m256i u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(15));
  uint32_t h;
  if (BITS >= 5) {
    std::memcpy(&h, p + 16, 4);
    u = _mm256_or_si256(u, _mm256_and_si256(bit_bytes32(h), _mm256_set1_epi8(16)));
  }
  if (BITS == 6) {
    std::memcpy(&h, p + 20, 4);
    u = _mm256_or_si256(u, _mm256_and_si256(bit_bytes32(h), _mm256_set1_epi8(32)));
  }
  return _mm256_sub_epi8(u, bias);
}

// Half `half` (0: inputs 0..15, 1: 16..31) of a chunk's codes: a group of 16 (Q6_K).
template <int BITS>
static inline __m128i unpack16(const uint8_t* p, int64_t half, __m128i bias) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i u = _mm_and_si128(_mm_srl_epi16(raw, _mm_cvtsi32_si128(static_cast<int>(4 * half))), _mm_set1_epi8(15));
  uint32_t h;
  if (BITS >= 5) {
    std::memcpy(&h, p + 16, 4);
    u = _mm_or_si128(u, _mm_and_si128(bit_bytes16(h >> (16 * half)), _mm_set1_epi8(16)));
  }
  if (BITS == 6) {
    std::memcpy(&h, p + 20, 4);
    u = _mm_or_si128(u, _mm_and_si128(bit_bytes16(h >> (16 * half)), _mm_set1_epi8(32)));
  }
  return _mm_sub_epi8(u, bias);
}

// 8 codes as float32 (the low 8 bytes of c), and 16.
static inline __m256 codes_f8(__m128i c) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)); }
#endif
#ifdef __AVX512F__
static inline __m512 codes_f16(__m128i c) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)); }
#endif

// ------------------------------------------------------------------------------------------------ row readers
// A product's dot loops read a weight row through one of these: group(g) gives group g's codes, f8(k) / f16(k) the
// 8 / 16 codes at offset k in it as float32 (k a multiple of 8 / 16), scalar(buf) the row as int8 for the portable
// loop. kG: the group size a reader is made for (0: any).

// int8 codes [K] per row (the format every kernel takes).
struct I8Row {
  static constexpr int kG = 0;
  const int8_t* c;
  int64_t G;
  struct Group {
    const int8_t* p;
#ifdef __AVX2__
    __m256 f8(int64_t k) const { return codes_f8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + k))); }
#endif
#ifdef __AVX512F__
    __m512 f16(int64_t k) const { return codes_f16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k))); }
#endif
  };
  Group group(int64_t g) const { return {c + g * G}; }
  const int8_t* scalar(int8_t*, int64_t) const { return c; }
};

// Packed codes (the layout above), groups of GT = 16 or 32.
template <int BITS, int GT>
struct PackedRow {
  static_assert(GT == 16 || GT == 32, "packed groups are 16 or 32 inputs");
  static constexpr int kG = GT;
  static constexpr int64_t CB = 16 + 4 * (BITS - 4);
  const uint8_t* p;
  int32_t bias;  // code = u - bias (as int8 in the byte paths: mod 256)
#ifdef AVX2_ONLY
  // AVX2: each 8 codes straight to int32 lanes (the nibble bytes zero-extended from memory, a plane's bit tested
  // per lane), then converted as int8 codes are: fewer shuffles than unpacking bytes and extracting quarters, which
  // the shuffle ports limit. Group g's input k is chunk input o + k (o = 0, or 16 for a group of 16 in a chunk's
  // second half); its nibble is byte (o + k) % 16, high when o + k >= 16; its plane bits are bit o + k.
  struct Group8 {
    const uint8_t* c;
    int64_t o;       // 0 or 16 (a runtime half for a group of 16)
    __m256i h4, h5;  // the planes shifted right by o, broadcast
    __m256i bias;
    // 16 (32) in lane j where bit k + j of plane h is set
    static __m256i bit_lanes(__m256i h, int64_t k, int v) {
      const __m256i bit = _mm256_sllv_epi32(_mm256_set1_epi32(1), _mm256_add_epi32(
          _mm256_set1_epi32(static_cast<int>(k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
      return _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_and_si256(h, bit), bit), _mm256_set1_epi32(v));
    }
    __m256 f8(int64_t k) const {
      const int64_t i = (GT == 32 ? k : o + k);
      const __m256i raw = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + (i & 8))));
      __m256i u;
      if (GT == 32) {
        u = i & 16 ? _mm256_srli_epi32(raw, 4) : _mm256_and_si256(raw, _mm256_set1_epi32(15));
      } else {
        u = _mm256_and_si256(_mm256_srl_epi32(raw, _mm_cvtsi64_si128(o >> 2)), _mm256_set1_epi32(15));
      }
      if (BITS >= 5) u = _mm256_or_si256(u, bit_lanes(h4, k, 16));
      if (BITS == 6) u = _mm256_or_si256(u, bit_lanes(h5, k, 32));
      return _mm256_cvtepi32_ps(_mm256_sub_epi32(u, bias));
    }
  };
  Group8 group(int64_t g) const {
    const int64_t o = GT == 32 ? 0 : (g & 1) * 16;
    const uint8_t* c = p + (GT == 32 ? g : g >> 1) * CB;
    uint32_t a = 0, b = 0;
    if (BITS >= 5) std::memcpy(&a, c + 16, 4);
    if (BITS == 6) std::memcpy(&b, c + 20, 4);
    return Group8{c, o, _mm256_set1_epi32(static_cast<int>(a >> o)), _mm256_set1_epi32(static_cast<int>(b >> o)),
                  _mm256_set1_epi32(bias)};
  }
#elif defined(__AVX2__)
  // AVX-512 builds: a chunk unpacked to bytes in registers, 16 codes at a time to int32 lanes.
  struct Group32 {  // a whole chunk
    __m256i c;
    __m128i part(int64_t k) const { return k & 16 ? _mm256_extracti128_si256(c, 1) : _mm256_castsi256_si128(c); }
#ifdef __AVX512F__
    __m512 f16(int64_t k) const { return codes_f16(part(k)); }
#endif
  };
  struct Group16 {  // half a chunk
    __m128i c;
#ifdef __AVX512F__
    __m512 f16(int64_t) const { return codes_f16(c); }
#endif
  };
  auto group(int64_t g) const {
    if constexpr (GT == 32) {
      return Group32{unpack32<BITS>(p + g * CB, _mm256_set1_epi8(static_cast<int8_t>(bias)))};
    } else {
      return Group16{unpack16<BITS>(p + (g >> 1) * CB, g & 1, _mm_set1_epi8(static_cast<int8_t>(bias)))};
    }
  }
#endif
  const int8_t* scalar(int8_t* buf, int64_t K) const {
    unpack_row_scalar<BITS>(p, K, static_cast<int8_t>(bias), buf);
    return buf;
  }
};

// Rows [0, N) of packed codes into out [N, K] int8 (the qmatmul_wide blocks' staging, and unpack_codes).
template <int BITS>
static inline void unpack_rows(const uint8_t* p, int64_t rows, int64_t K, int8_t bias, int8_t* out) {
  constexpr int64_t CB = 16 + 4 * (BITS - 4);
  const int64_t nc = K / PACK_CHUNK;
#ifdef __AVX2__
  const __m256i b = _mm256_set1_epi8(bias);
  for (int64_t i = 0; i < rows * nc; ++i)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * PACK_CHUNK), unpack32<BITS>(p + i * CB, b));
#else
  for (int64_t r = 0; r < rows; ++r) unpack_row_scalar<BITS>(p + r * nc * CB, K, bias, out + r * K);
#endif
}

// Calls f(std::integral_constant<int, bits>) for bits 4, 5 or 6.
template <typename F>
static inline auto with_bits(int64_t bits, F&& f) {
  switch (bits) {
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    default: return f(std::integral_constant<int, 6>{});
  }
}

// The checks every packed op makes: uint8 [N, K/32 * chunk bytes], 4 to 6 bits, a group of 16 or 32.
static inline void check_packed(const char* op, const at::Tensor& packed, int64_t bits, int64_t bias, int64_t K,
                                int64_t G) {
  TORCH_CHECK(bits >= 4 && bits <= 6, op, ": packed codes have 4, 5 or 6 bits, not ", bits);
  TORCH_CHECK(bias >= -127 && bias <= 128, op, ": bias ", bias, " is not minus an int8 code");
  TORCH_CHECK(K % PACK_CHUNK == 0 && (G == 16 || G == 32), op, ": packed codes need K % 32 == 0 and a group of 16 "
              "or 32 (K=", K, ", G=", G, ")");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.size(1) == K / PACK_CHUNK *
              pack_chunk_bytes(bits), op, ": packed codes must be uint8 [N, K/32 * ", pack_chunk_bytes(bits), "]");
}

// unpack_codes: packed codes -> int8 [N, K] (the kernels that read int8 only get their codes from this, once).
at::Tensor unpack_codes(const at::Tensor& packed_in, int64_t bits, int64_t bias, int64_t K) {
  check_packed("unpack_codes", packed_in, bits, bias, K, 32);
  const at::Tensor packed = packed_in.contiguous();
  const int64_t N = packed.size(0), rb = packed.size(1);
  at::Tensor out = at::empty({N, K}, packed.options().dtype(at::kChar));
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  int8_t* op = out.data_ptr<int8_t>();
  with_bits(bits, [&](auto b) {
    par_for(0, N, std::max<int64_t>(1, 65536 / K), [&](int64_t s, int64_t e) {
      unpack_rows<decltype(b)::value>(pp + s * rb, e - s, K, static_cast<int8_t>(bias), op + s * K);
    });
  });
  return out;
}

// pack_codes: int8 codes [N, K] -> the packed layout above at `bits` bits with `bias` (every code + bias must lie in
// [0, 2^bits); checked). One pass, no temporaries beyond the result (kernels/packed.py has the torch reference).
at::Tensor pack_codes(const at::Tensor& codes_in, int64_t bits, int64_t bias) {
  TORCH_CHECK(codes_in.dim() == 2 && codes_in.scalar_type() == at::kChar, "pack_codes: codes must be int8 [N, K]");
  const at::Tensor codes = codes_in.contiguous();
  const int64_t N = codes.size(0), K = codes.size(1), cb = pack_chunk_bytes(bits), nc = K / PACK_CHUNK;
  at::Tensor out = at::empty({N, nc * cb}, codes.options().dtype(at::kByte));
  check_packed("pack_codes", out, bits, bias, K, 32);
  const int8_t* cp = codes.data_ptr<int8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  std::atomic<bool> fits{true};
  par_for(0, N * nc, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int8_t* c = cp + i * PACK_CHUNK;
      uint8_t* o = op + i * cb;
      uint32_t u[32], h4 = 0, h5 = 0;
      for (int j = 0; j < 32; ++j) {
        u[j] = static_cast<uint8_t>(c[j] + bias);
        if (u[j] >> bits) fits = false;
        h4 |= ((u[j] >> 4) & 1u) << j;
        h5 |= ((u[j] >> 5) & 1u) << j;
      }
      for (int j = 0; j < 16; ++j) o[j] = static_cast<uint8_t>((u[j] & 15u) | (u[j + 16] & 15u) << 4);
      if (bits >= 5) std::memcpy(o + 16, &h4, 4);
      if (bits == 6) std::memcpy(o + 20, &h5, 4);
    }
  });
  TORCH_CHECK(fits.load(), "pack_codes: some code + ", bias, " does not fit ", bits, " bits");
  return out;
}

}  // namespace
