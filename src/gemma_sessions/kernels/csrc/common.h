// Shared by every kernel: headers, the instruction-set macros of this build (AVX2_ONLY, HAVE_AMX), and the
// row-block helpers. Part of the kernels' one translation unit (ops.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
// AMX (AMX-INT8 tiles): qmatmul_i16's products on the tile unit (see i16_amx_block).
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__AVX512VNNI__) && \
    defined(__AVX512BW__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
// Without AVX-512 (AVX2 + FMA only) the hot loops have 8-lane versions (AVX2_ONLY).
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define AVX2_ONLY 1
constexpr bool ROWS_OUTER = true;  // qmatmul of many rows: row blocks outside the weight tile (see tiled)
#else
constexpr bool ROWS_OUTER = false;
#endif
#if defined(__AVX512F__) || defined(AVX2_ONLY)
// The sum of 4 lanes in registers, the last step of hsum (16 lanes) and hsum8 (8 lanes).
static inline float hsum4(__m128 b) {
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  b = _mm_add_ss(b, _mm_movehdup_ps(b));
  return _mm_cvtss_f32(b);
}
#endif

namespace {

constexpr int64_t MB_MAX = 16;  // rows of x per block (16 accumulators + the weight vector fit 32 registers)
constexpr int64_t MB_QMM = 8;   // qmatmul's blocks: 8 accumulators + 8 group sums + weight and x in registers


// Calls f(std::integral_constant<int, mb>) for mb in 1..MB_MAX (above: MB_MAX): the row count of a block as a
// compile-time constant, so each block size gets its own register-resident accumulators.
template <typename F>
static inline void with_rows(int64_t mb, F&& f) {
  switch (mb) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 9: return f(std::integral_constant<int, 9>{});
    case 10: return f(std::integral_constant<int, 10>{});
    case 11: return f(std::integral_constant<int, 11>{});
    case 12: return f(std::integral_constant<int, 12>{});
    case 13: return f(std::integral_constant<int, 13>{});
    case 14: return f(std::integral_constant<int, 14>{});
    case 15: return f(std::integral_constant<int, 15>{});
    default: return f(std::integral_constant<int, 16>{});
  }
}

// Rows [0, M) in passes of at most MAXR rows: f(std::integral_constant<int, rows>, m0, rows) per pass. BALANCED
// splits them evenly (9 rows at 8: 5 + 4, not 8 + 1, whose lone accumulator chain waits on the instruction's
// latency); otherwise full passes first.
template <int MAXR, bool BALANCED, typename F>
static inline void row_passes(int64_t M, F&& f) {
  const int64_t passes = (M + MAXR - 1) / MAXR;
  const int64_t pass = BALANCED && passes > 0 ? (M + passes - 1) / passes : MAXR;
  for (int64_t m0 = 0; m0 < M; m0 += pass) {
    const int64_t mb = std::min(pass, M - m0);
    with_rows(mb, [&](auto rows) {
      if constexpr (decltype(rows)::value <= MAXR) f(rows, m0, mb);
    });
  }
}

}  // namespace
