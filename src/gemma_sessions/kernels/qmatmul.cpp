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
// AMX (Sapphire Rapids and later): qmatmul_i16's products on the tile unit (see i16_amx_block).
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__AVX512VNNI__) && \
    defined(__AVX512BW__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
// Without AVX-512 (AVX2 + FMA: Zen 1-3, most Intel client CPUs) the hot loops have 8-lane versions (AVX2_ONLY).
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


// ---------------------------------------------------------------------------------------------------- thread pool
// The kernels' parallel loops run on this pool, not at::parallel_for (OpenMP). libgomp keeps one team of workers per
// thread that starts parallel regions, and once it manages more threads than there are CPUs (the main thread's team,
// made while the model loaded, plus the engine loop thread's team) it cuts its workers' spinning to ~100 iterations:
// every region then wakes them from a futex. A decode step is ~150 regions; on the 270M with 2 cores that made a
// step 31-33 ms on the engine's thread against 21 ms on the main thread. This pool's workers spin for SPIN_US after
// each job (a step's next kernel comes within that), then sleep. One job runs at a time; a caller that finds the pool
// busy (another thread's kernel) runs its loop on its own thread. Chunks as at::parallel_for makes them:
// min(threads, ceil(n / grain)) contiguous ranges; torch.set_num_threads sets the thread count.
constexpr int64_t SPIN_US = 300;

class Pool {
 public:
  // Runs task(i) for i in [0, ntasks), task(0) on the caller; returns when all are done (rethrows the first error).
  void run(const std::function<void(int)>& task, int ntasks) {
    ensure(ntasks - 1);
    job_ = &task;
    error_ = nullptr;
    remaining_.store(ntasks - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(sleep_mu_);
      state_.store(((state_.load(std::memory_order_relaxed) >> 16) + 1) << 16 | static_cast<uint64_t>(ntasks),
                   std::memory_order_release);
      if (sleepers_ > 0) cv_.notify_all();
    }
    try {
      task(0);
    } catch (...) {
      record(std::current_exception());
    }
    while (remaining_.load(std::memory_order_acquire) != 0) pause();
    if (error_) std::rethrow_exception(error_);
  }

  std::mutex busy;  // held by the caller whose job runs

 private:
  static inline void pause() {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }

  void ensure(int n) {
    while (workers_ < n) {
      ++workers_;
      std::thread(&Pool::work, this, workers_, state_.load(std::memory_order_relaxed)).detach();
    }
  }

  void record(std::exception_ptr e) {
    std::lock_guard<std::mutex> lk(error_mu_);
    if (!error_) error_ = e;
  }

  // state_ = (epoch << 16) | ntasks, one word, so a worker never pairs one job's epoch with another's task count.
  void work(int idx, uint64_t seen) {
    using clock = std::chrono::steady_clock;
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      if (s >> 16 == seen >> 16) {
        const auto t0 = clock::now();
        for (int spins = 0; (s = state_.load(std::memory_order_acquire)) >> 16 == seen >> 16; ++spins) {
          pause();
          if ((spins & 255) == 255 && clock::now() - t0 > std::chrono::microseconds(SPIN_US)) {
            std::unique_lock<std::mutex> lk(sleep_mu_);
            ++sleepers_;
            cv_.wait(lk, [&] { return state_.load(std::memory_order_acquire) >> 16 != seen >> 16; });
            --sleepers_;
            spins = 0;
          }
        }
      }
      seen = s;
      if (idx < static_cast<int>(s & 0xffff)) {
        try {
          (*job_)(idx);
        } catch (...) {
          record(std::current_exception());
        }
        remaining_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  int workers_ = 0;  // guarded by busy
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<uint64_t> state_{0};
  std::atomic<int> remaining_{0};
  std::mutex sleep_mu_, error_mu_;
  std::condition_variable cv_;
  int sleepers_ = 0;  // guarded by sleep_mu_
  std::exception_ptr error_;
};

// One pool per process, never destroyed (its detached workers may outlive static destructors). A forked child has
// none of its parent's threads: it starts a new pool (the parent's is leaked in the child).
static std::atomic<Pool*> g_pool{nullptr};
static std::once_flag g_atfork;

static Pool& pool() {
  std::call_once(g_atfork, [] { pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); }); });
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p == nullptr) {
    Pool* fresh = new Pool();
    if (g_pool.compare_exchange_strong(p, fresh)) return *fresh;
    delete fresh;
  }
  return *p;
}

thread_local bool t_in_job = false;

// f(b, e) over [begin, end) in chunks, as at::parallel_for(begin, end, grain, f) would split it.
template <typename F>
static void par_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  const int64_t n = end - begin;
  const int64_t threads = std::min<int64_t>({at::get_num_threads(), (n + std::max<int64_t>(grain, 1) - 1) /
                                             std::max<int64_t>(grain, 1), 0xffff});
  if (threads <= 1 || t_in_job) return f(begin, end);
  Pool& p = pool();
  std::unique_lock<std::mutex> lk(p.busy, std::try_to_lock);
  if (!lk.owns_lock()) return f(begin, end);
  const int64_t chunk = (n + threads - 1) / threads;
  const int ntasks = static_cast<int>((n + chunk - 1) / chunk);
  const std::function<void(int)> task = [&](int i) {
    struct InJob {  // a loop inside the job (none today) runs inline, even if the job throws
      bool outer = t_in_job;
      InJob() { t_in_job = true; }
      ~InJob() { t_in_job = outer; }
    } in_job;
    const int64_t b = begin + i * chunk;
    f(b, std::min(end, b + chunk));
  };
  p.run(task, ntasks);
}

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
template <int MB, bool OFF>
static inline void dot_rows(const float* x, int64_t K, const int8_t* c, const float* sc, int64_t G,
                            const float* off, const float* xs, float* dots) {
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t ng = K / G;
  for (int64_t g = 0; g < ng; ++g) {
    const int8_t* cg = c + g * G;
    const float* xg = x + g * G;
    __m512 t[MB];
    __m512 w = load_codes16(cg);
    for (int m = 0; m < MB; ++m) t[m] = _mm512_mul_ps(_mm512_loadu_ps(xg + m * K), w);
    for (int64_t k = 16; k < G; k += 16) {
      w = load_codes16(cg + k);
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

template <int MB>
static inline void dot_rows_any(const float* x, int64_t K, const int8_t* c, const float* sc, int64_t G,
                                const float* off, const float* xs, float* dots) {
  if (off != nullptr) return dot_rows<MB, true>(x, K, c, sc, G, off, xs, dots);
  return dot_rows<MB, false>(x, K, c, sc, G, off, xs, dots);
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
template <int MB, int GT>
static inline void dot_rows8(const float* x, int64_t K, const int8_t* c, const float* sc, int64_t G_arg,
                             const float* off, const float* xs, float* dots) {
  const int64_t G = GT > 0 ? GT : G_arg;
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  const int64_t ng = K / G;
  for (int64_t g = 0; g < ng; ++g) {
    const int8_t* cg = c + g * G;
    const float* xg = x + g * G;
    // two chains per row (even and odd vectors of the group): half the dependent FMA latency per group
    __m256 t0[MB], t1[MB];
    __m256 w = load_codes8(cg);
    for (int m = 0; m < MB; ++m) t0[m] = _mm256_mul_ps(_mm256_loadu_ps(xg + m * K), w);
    if (G >= 16) {
      w = load_codes8(cg + 8);
      for (int m = 0; m < MB; ++m) t1[m] = _mm256_mul_ps(_mm256_loadu_ps(xg + m * K + 8), w);
    }
    for (int64_t k = 16; k < G; k += 16) {
      w = load_codes8(cg + k);
      for (int m = 0; m < MB; ++m) t0[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xg + m * K + k), w, t0[m]);
      if (k + 8 < G) {
        w = load_codes8(cg + k + 8);
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

static inline void dot_block(const float* x, int64_t mb, int64_t K, const int8_t* c, const float* sc, int64_t G,
                             const float* off, const float* xs, float* dots) {
#ifdef __AVX512F__
  if (G % 16 == 0) {
    return with_rows(mb, [&](auto rows) { dot_rows_any<decltype(rows)::value>(x, K, c, sc, G, off, xs, dots); });
  }
#endif
#ifdef AVX2_ONLY
  if (G % 8 == 0) {
    const int64_t ng = K / G;
    return row_passes<4, false>(mb, [&](auto rows, int64_t m0, int64_t) {
      constexpr int R = decltype(rows)::value;
      const float* xsr = off != nullptr ? xs + m0 * ng : nullptr;
      if (G == 32) return dot_rows8<R, 32>(x + m0 * K, K, c, sc, G, off, xsr, dots + m0);
      if (G == 16) return dot_rows8<R, 16>(x + m0 * K, K, c, sc, G, off, xsr, dots + m0);
      dot_rows8<R, 0>(x + m0 * K, K, c, sc, G, off, xsr, dots + m0);
    });
  }
#endif
  dot_rows_scalar(x, mb, K, c, sc, G, off, dots);
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
// and a thread that computes on them streamed below the bandwidth. Measured on the 270M's 72 layer products (and its
// head), four alternating runs: 4 rows 9.3-10.8 -> 7.7-9.6 ms (head 11.2-12.9 -> 10.5-12.5), 8 rows 16.4-19.1 ->
// 15.3-18.1 ms (head 22.3-25.7 -> 20.2-21.3); 1 row unchanged (it streams at the bandwidth already), so there the
// hardware prefetcher is left alone.
constexpr int64_t QMM_PREFETCH = 32;

at::Tensor qmatmul(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& scales_in,
                   const c10::optional<at::Tensor>& offsets_in, int64_t G) {
  TORCH_CHECK(x_in.dim() == 2 && codes_in.dim() == 2, "qmatmul: x [M, K] and codes [N, K] must be 2-D");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "qmatmul: x must be float32");
  TORCH_CHECK(codes_in.scalar_type() == at::kChar, "qmatmul: codes must be int8");
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat, "qmatmul: scales must be float32");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = codes_in.size(0);
  TORCH_CHECK(codes_in.size(1) == K, "qmatmul: x has K=", K, ", codes K=", codes_in.size(1));
  TORCH_CHECK(G > 0 && K % G == 0, "qmatmul: group size ", G, " must divide K=", K);
  const int64_t ng = K / G;
  TORCH_CHECK(scales_in.size(0) == N && scales_in.size(1) == ng, "qmatmul: scales must be [N, K/G]");
  const at::Tensor x = x_in.contiguous(), codes = codes_in.contiguous(), scales = scales_in.contiguous();
  at::Tensor offsets;
  const float* xp = x.data_ptr<float>();
  const bool has_off = offsets_in.has_value() && offsets_in->defined();
  if (has_off) {
    offsets = offsets_in->contiguous();
    TORCH_CHECK(offsets.scalar_type() == at::kFloat && offsets.size(0) == N && offsets.size(1) == ng,
                "qmatmul: offsets must be float32 [N, K/G]");
  }
  at::Tensor out = at::empty({M, N}, x.options());
  const int8_t* cp = codes.data_ptr<int8_t>();
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
    // each x load) is ~25% faster on a cache-resident weight but ~20-30% slower in real decoding, where every
    // weight streams from memory once per token (measured: decode 32 vs 39 tok/s on the 270M).
    tiled(M, N, begin, end, outp, [&](int64_t n, int64_t m0, int64_t mb, float* dots) {
      if (M >= 2 && m0 == 0 && n + QMM_PREFETCH < end) {  // a later weight row into L2 (see QMM_PREFETCH)
        const int8_t* p = cp + (n + QMM_PREFETCH) * K;
        for (int64_t b = 0; b < K; b += 64) __builtin_prefetch(p + b, 0, 2);
        __builtin_prefetch(sp + (n + QMM_PREFETCH) * ng, 0, 2);
        if (has_off) __builtin_prefetch(op + (n + QMM_PREFETCH) * ng, 0, 2);
      }
      dot_block(xp + m0 * K, mb, K, cp + n * K, sp + n * ng, G, has_off ? op + n * ng : nullptr,
                has_off ? xs.data() + m0 * ng : nullptr, dots);
    }, MB_QMM, ROWS_OUTER && M > MB_QMM);
  });
  return out;
}

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
// 16 codes per load where the group allows (Q8_0, Q4_K, Q5_K: 32; Q6_K: 16): ~1.5x faster than 8 per load.
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
// rows per chunk), ran ~50 GFLOP/s on 2 cores at 297 rows of the 270M's layers, against ~85 for torch's float32 GEMM
// over dequantized tiles, which this replaces for prompts (113-126 GFLOP/s per product at 294 rows).
// From 17 rows (a batched decode step, a short prompt), the 270M's 72 layer products, ms (medians of 7, alternating
// builds, a noisy 2-core Zen 3), small-batch loop / this: 24 rows 104-118 / 72-76, 32 rows 91-93 / 97-100, 48 rows
// 134-141 / 116-133; 12 and 16 rows within the noise (the small-batch loop kept). A 49-51 token prompt's forward:
// 207-261 -> 160-209 ms. K is a multiple of 8 (G is, and divides K): gemm_dequant's blocks of 8 inputs.
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
// and of W (32 KB) stay near L1. Measured at 294 rows, 2 threads, K = 2048: ~100 against ~70 GFLOP/s unblocked; at
// K = 640 blocks of 320 were slower (~70 against ~110).
static inline int64_t gemm_kc(int64_t K) { return K <= 1024 ? K : 512; }

static void wide_gemm(const float* xp, int64_t M, int64_t K, const int8_t* cp, const float* sp, const float* op,
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
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk * 16, nr = std::min<int64_t>(16, N - n);
      gemm_dequant(cp + n * K, sp + n * ng, op != nullptr ? op + n * ng : nullptr, K, G, nr, b);
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


at::Tensor qmatmul_wide(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& scales_in,
                        const c10::optional<at::Tensor>& offsets_in, int64_t G) {
  TORCH_CHECK(kWide, "qmatmul_wide: this build has no AVX2-only path");
  TORCH_CHECK(x_in.dim() == 2 && codes_in.dim() == 2, "qmatmul_wide: x [M, K] and codes [N, K] must be 2-D");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "qmatmul_wide: x must be float32");
  TORCH_CHECK(codes_in.scalar_type() == at::kChar, "qmatmul_wide: codes must be int8");
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat, "qmatmul_wide: scales must be float32");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = codes_in.size(0);
  TORCH_CHECK(codes_in.size(1) == K, "qmatmul_wide: x has K=", K, ", codes K=", codes_in.size(1));
  TORCH_CHECK(G > 0 && G % 8 == 0 && K % G == 0, "qmatmul_wide: group size ", G, " must divide K=", K,
              " and be a multiple of 8");
  const int64_t ng = K / G;
  TORCH_CHECK(scales_in.size(0) == N && scales_in.size(1) == ng, "qmatmul_wide: scales must be [N, K/G]");
  const at::Tensor x = x_in.contiguous(), codes = codes_in.contiguous(), scales = scales_in.contiguous();
  at::Tensor offsets;
  const bool has_off = offsets_in.has_value() && offsets_in->defined();
  if (has_off) {
    offsets = offsets_in->contiguous();
    TORCH_CHECK(offsets.scalar_type() == at::kFloat && offsets.size(0) == N && offsets.size(1) == ng,
                "qmatmul_wide: offsets must be float32 [N, K/G]");
  }
  at::Tensor out = at::empty({M, N}, x.options());
#ifdef AVX2_ONLY
  if (M > WIDE_GEMM_MIN_ROWS) {
    wide_gemm(x.data_ptr<float>(), M, K, codes.data_ptr<int8_t>(), scales.data_ptr<float>(),
              has_off ? offsets.data_ptr<float>() : nullptr, N, G, out.data_ptr<float>());
    return out;
  }
  // up to WIDE_GEMM_MIN_ROWS rows: x transposed, [K][mc] with mc its row count rounded up to 8
  const int64_t mc = (M + 7) / 8 * 8;
  std::vector<float> xt(mc * K, 0.f);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xt[k * mc + m] = xp[m * K + k];
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* op = has_off ? offsets.data_ptr<float>() : nullptr;
  float* outp = out.data_ptr<float>();
  par_for(0, N, WIDE_NT, [&](int64_t begin, int64_t end) {
    std::vector<float> wb_store(WIDE_NR * K + 16);  // wb 64-byte aligned: no store splits a cache line
    float* const wbp = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(wb_store.data()) + 63) & ~uintptr_t{63});
    std::vector<float> tile(M * WIDE_NT);
    for (int64_t n0 = begin; n0 < end; n0 += WIDE_NT) {
      const int64_t nt = std::min(WIDE_NT, end - n0);
      for (int64_t j0 = 0; j0 < nt; j0 += WIDE_NR) {
        const int64_t nr = std::min<int64_t>(WIDE_NR, nt - j0), n = n0 + j0;
        wide_dequant(cp + n * K, sp + n * ng, has_off ? op + n * ng : nullptr, K, G, nr, wbp);
        if (n + WIDE_PREFETCH + WIDE_NR <= end) {  // a later block's weights into L2 while this one computes
          const int8_t* pc = cp + (n + WIDE_PREFETCH) * K;
          for (int64_t b = 0; b < WIDE_NR * K; b += 64) __builtin_prefetch(pc + b, 0, 2);
          for (int64_t b = 0; b < WIDE_NR * ng; b += 16) {
            __builtin_prefetch(sp + (n + WIDE_PREFETCH) * ng + b, 0, 2);
            if (has_off) __builtin_prefetch(op + (n + WIDE_PREFETCH) * ng + b, 0, 2);
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
#endif
  return out;
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
  // group of column k: a shift for the power-of-two sizes of every GGUF type (an idiv per 32 columns was ~5% of
  // the time), a division otherwise
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
  // 16 row pointers the compiler ran out of registers and spilled in the inner loop, ~25% slower)
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
// load waits on the store just issued (one buffer measured ~1.1-1.2x the AVX-512 kernel, hot, at 16 rows).
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

// argmax over the last dimension of float32 [R, V] -> int64 [R], as torch.argmax: the first maximal index, and a NaN
// counts as the maximum (the first NaN wins). Each row is split into chunks scanned in parallel (a vocabulary row of
// 262144 logits: ~30 us against ~500 us for torch.argmax, whose OpenMP region also left a worker spinning into the
// next step's kernels).
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
// instructions per 8 vpdpbusd where there are now 10. One bound per row made the 16-row head ~15% faster
// (bench/head.py); the extra exact logits cost microseconds.
//
// Weights are re-laid once (q8_head_pack): codes + 128 as uint8 [N/16][K/4][16][4] (16 outputs per vector, 4
// inputs per lane: vpdpbusd's layout), scales as [N/16][K/32][16], and max_n A[n, g] as [K/32]. Needs AVX512-VNNI,
// G = 32, no offsets (a Q8_0 or symmetric head), N % 16 == 0.
//
// On AVX2 without AVX-512 (Q8_LANES = 8): the same codes + 128 as [N/8][K/4][8][4], scales as [N/8][K/32][8]. Four
// products per lane by vpmaddubsw (uint8 codes + 128 times int8 q), then vpmaddwd with ones into int32: 32 products
// in two multiplies, against 16 for two float FMAs. vpmaddubsw saturates a pair's sum at int16, so x is quantized to
// 7 bits there (s = max|x| / 63, |q| <= 63: 255 * 63 * 2 < 32767), which doubles the error bound (about twice the
// candidates, each one exact logit); the same correction, bound and exact decision. (vpsignb on |q| and signed codes
// kept 8 bits but cost a third instruction per 32 products: 45 against ~36 ms at 16 rows of the 270M's head.)
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
// on the 270M, per call), and without it a thread read only ~6 GB/s while computing (21 GB/s when only reading):
// a 16-row call took about the sum of its compute and memory times. Measured in isolation: 34.7 -> ~24.5 ms per
// thread for the 270M's head at 16 rows (distances 1-16 blocks within noise; the L1 hint gained nothing). Below 4
// rows the call is bound by memory alone and the hardware prefetcher does better by itself (1 row: ~5 vs ~8 ms).
constexpr int64_t Q8_PREFETCH = 8;
constexpr int64_t Q8_MB = 8;  // rows per block: 8 chains + 8 value accumulators + 8 weight vectors
constexpr int Q8_MB8 = 6;     // AVX2: 6 int32 sums + 6 value accumulators (4 rows: within the noise, 30 vs 23 ms at 8)

std::tuple<at::Tensor, at::Tensor, at::Tensor> q8_head_pack(const at::Tensor& codes_in, const at::Tensor& scales_in) {
  TORCH_CHECK(codes_in.dim() == 2 && codes_in.scalar_type() == at::kChar, "q8_head_pack: codes must be int8 [N, K]");
  const int64_t N = codes_in.size(0), K = codes_in.size(1);
  TORCH_CHECK(N % 16 == 0 && K % 32 == 0, "q8_head_pack: N % 16 and K % 32 must be 0");
  constexpr int64_t L = Q8_LANES;
  const int64_t ng = K / 32;
  TORCH_CHECK(scales_in.scalar_type() == at::kFloat && scales_in.dim() == 2 && scales_in.size(0) == N &&
              scales_in.size(1) == ng, "q8_head_pack: scales must be float32 [N, K/32]");
  const at::Tensor codes = codes_in.contiguous(), scales = scales_in.contiguous();
  at::Tensor wq = at::empty({N / L, K / 4, L, 4}, codes.options().dtype(at::kByte));
  at::Tensor sw = at::empty({N / L, ng, L}, scales.options());
  at::Tensor a_all = at::empty({N, ng}, scales.options());  // sum |W| per output and group
  const int8_t* cp = codes.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  uint8_t* wp = wq.data_ptr<uint8_t>();
  float* swp = sw.data_ptr<float>();
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
          swp[(nb * ng + g) * L + j] = s;
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
template <int MB>
static inline void q8_block8(const uint8_t* wb, const float* swb, const int8_t* xq, int64_t K, const float* sx,
                             const int32_t* corr, int64_t ng, __m256* val, bool prefetch) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 accf[MB];
  for (int r = 0; r < MB; ++r) accf[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* wg = wb + g * 8 * 32;
    if (prefetch) {  // the block Q8_PREFETCH ahead: its weights and scales into L2
      const uint8_t* pw = wg + Q8_PREFETCH * 8 * K;
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(pw + 64 * j), _MM_HINT_T1);
      if (g % 8 == 0) _mm_prefetch(reinterpret_cast<const char*>(swb + (Q8_PREFETCH * ng + g) * 8), _MM_HINT_T1);
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
    const __m256 s = _mm256_loadu_ps(swb + g * 8);
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
struct Q8W {
  using V = __m256;
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
  static void block(const uint8_t* wb, const float* swb, const int8_t* xq, int64_t K, const float* sx,
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
  const float* swp = sw.data_ptr<float>();
  float* lp = want_logits ? logits.data_ptr<float>() : nullptr;
  std::mutex mu;
  std::vector<float> thr_all(M, -INFINITY);
  std::vector<Q8Cand> cands;
  using W = Q8W;
  par_for(0, N / W::L, W::GRAIN, [&](int64_t begin, int64_t end) {
    std::vector<W::V> tv(M, W::set1(-INFINITY));
    std::vector<float> thr(M, -INFINITY);
    std::vector<Q8Cand> mine;
    W::V val[W::MB];
    for (int64_t nb = begin; nb < end; ++nb) {
      const uint8_t* wb = wp + nb * W::L * K;
      // full passes first: the first pass streams (and prefetches) the weights from memory, and a full one hides
      // that best (balanced passes, 5 + 4 at 9 rows and 6 + 6 at 12, measured 3-10% slower)
      row_passes<W::MB, false>(M, [&](auto rows, int64_t m0, int64_t mb) {
        W::block<decltype(rows)::value>(wb, swp + nb * ng * W::L, xq.data() + m0 * K, K, sx.data() + m0 * ng,
                                        corr.data() + m0 * ng, ng, val, m0 == 0 && M >= 4 && nb + Q8_PREFETCH < end);
        for (int64_t r = 0; r < mb; ++r) {
          const int64_t m = m0 + r;
          if (lp != nullptr) W::store(lp + m * N + nb * W::L, val[r]);
          const W::V bnd = W::set1(brow[m]);
          const W::V lo = W::sub(val[r], bnd), hi = W::add(val[r], bnd);
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
  // the exact logits of the candidates decide (in order of n: ties go to the lowest index)
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
    dot_block(xp + c.row * K, 1, K, cp + c.n * K, sp + c.n * ng, 32, nullptr, nullptr, &v);
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

// decode_stack: every decoder layer of a decode step (one new token per row, the paged KV cache) in one call: the
// same kernels, in the same order, as GemmaModel._hidden_fused with PagedBatch.attend (so the same bits): products
// of up to 8 rows run qmatmul, larger ones qmatmul_i16 (wide given) or qmatmul_bf16 (the caller checks that
// Linear.forward chooses them too),
// without ~200 Python-level calls per step. Absent tensors (no offsets, no post norms, no q/k norms) are passed as
// empty tensors. Per layer l (lin: 12 tensors, codes/scales/offsets of qkv, o, gate_up, down; groups: 4 ints;
// norms: 6 tensors, input/post_attn/pre_mlp/post_mlp/q/k): h = in_norm(x) ... returns the final-normed hidden.
static inline c10::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

at::Tensor decode_stack(const at::Tensor& x_in, at::TensorList lin, at::TensorList wide, at::IntArrayRef groups,
                        at::TensorList norms,
                        const at::Tensor& final_norm, at::TensorList cos, at::TensorList sin, const at::Tensor& flat,
                        at::IntArrayRef off_k, at::IntArrayRef off_v, at::IntArrayRef layer_group,
                        at::TensorList write, at::TensorList table, at::TensorList start, at::TensorList lengths,
                        int64_t block, int64_t page_stride, double scale, double softcap, int64_t hq, int64_t hkv,
                        double eps, int64_t exact_rows) {
  const int64_t L = static_cast<int64_t>(groups.size()) / 4;
  TORCH_CHECK(L > 0 && static_cast<int64_t>(lin.size()) == 12 * L && static_cast<int64_t>(norms.size()) == 6 * L &&
                  static_cast<int64_t>(cos.size()) == L && static_cast<int64_t>(sin.size()) == L &&
                  static_cast<int64_t>(off_k.size()) == L && static_cast<int64_t>(off_v.size()) == L &&
                  static_cast<int64_t>(layer_group.size()) == L,
              "decode_stack: per-layer lists of inconsistent lengths");
  const int64_t M = x_in.size(0), S = flat.size(0);
  TORCH_CHECK(wide.empty() || static_cast<int64_t>(wide.size()) == 12 * L, "decode_stack: wide needs 12 per layer");
  TORCH_CHECK(M <= exact_rows || !wide.empty() || kBf16Dot || kWide, "decode_stack: ", M,
              " rows need qmatmul_i16's layout, qmatmul_bf16 or qmatmul_wide, which this build lacks");
  // a product of this step: qmatmul (exact) up to exact_rows rows, beyond qmatmul_i16 on its layout (wide: packed
  // codes, scales, offsets per product, i16_pack) when given, else qmatmul_wide (AVX2) or qmatmul_bf16
  const auto product = [&](const at::Tensor& x, const at::Tensor* w, const at::Tensor* p, int64_t G) {
    if (M <= exact_rows) return qmatmul(x, w[0], w[1], opt(w[2]), G);
    if (p != nullptr) return qmatmul_i16(x, p[0], p[1], p[2], G);
    return kWide ? qmatmul_wide(x, w[0], w[1], opt(w[2]), G) : qmatmul_bf16(x, w[0], w[1], opt(w[2]), G);
  };
  at::Tensor x = x_in.contiguous();
  at::Tensor h = rms_norm(x, norms[0], eps);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = lin.data() + 12 * l;
    const at::Tensor* pk = wide.empty() ? nullptr : wide.data() + 12 * l;
    const auto wp = [&](int j) { return pk == nullptr ? nullptr : pk + 3 * j; };
    const at::Tensor* nm = norms.data() + 6 * l;
    const int64_t g = layer_group[l];
    TORCH_CHECK(g >= 0 && g < static_cast<int64_t>(write.size()) && g < static_cast<int64_t>(table.size()),
                "decode_stack: bad layer group");
    at::Tensor qkv = product(h, w, wp(0), groups[4 * l]);
    auto qkv_split = qk_norm_rope(qkv, opt(nm[4]), opt(nm[5]), cos[l], sin[l], hq, hkv, eps);
    const at::Tensor& q = std::get<0>(qkv_split);
    flat.index_copy_(0, write[g] + off_k[l], std::get<1>(qkv_split).to(flat.scalar_type()));
    flat.index_copy_(0, write[g] + off_v[l], std::get<2>(qkv_split).to(flat.scalar_type()));
    at::Tensor att = decode_attention(q, flat.narrow(0, off_k[l], S - off_k[l]), flat.narrow(0, off_v[l], S - off_v[l]),
                                      table[g], start[g], lengths[g], block, page_stride, scale, softcap);
    at::Tensor a = product(att.reshape({M, -1}), w + 3, wp(1), groups[4 * l + 1]);
    auto r1 = add_rms_norm(x, a, opt(nm[1]), opt(nm[2]), eps);
    x = std::get<0>(r1);
    at::Tensor gu = product(std::get<1>(r1), w + 6, wp(2), groups[4 * l + 2]);
    at::Tensor m = product(geglu(gu), w + 9, wp(3), groups[4 * l + 3]);
    const at::Tensor& next = l + 1 < L ? norms[6 * (l + 1)] : final_norm;
    auto r2 = add_rms_norm(x, m, opt(nm[3]), next, eps);
    x = std::get<0>(r2);
    h = std::get<1>(r2);
  }
  return h;
}

}  // namespace

TORCH_LIBRARY(gemma_sessions, m) {
  m.def("qmatmul(Tensor x, Tensor codes, Tensor scales, Tensor? offsets, int group) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor scale, float eps) -> Tensor");
  m.def("argmax(Tensor x) -> Tensor");
  m.def("decode_stack(Tensor x, Tensor[] lin, Tensor[] wide, int[] groups, Tensor[] norms, Tensor final_norm, Tensor[] cos, "
        "Tensor[] sin, Tensor(a!) flat, int[] off_k, int[] off_v, int[] layer_group, Tensor[] write, Tensor[] table, "
        "Tensor[] start, Tensor[] lengths, int block, int page_stride, float scale, float softcap, int hq, int hkv, "
        "float eps, int exact_rows) -> Tensor");
  m.def("qmatmul_wide(Tensor x, Tensor codes, Tensor scales, Tensor? offsets, int group) -> Tensor");
  m.def("wide_available() -> bool", &wide_available);
  m.def("dequantize(Tensor codes, Tensor scales, Tensor? offsets, int group, int start, int end) -> Tensor");
  m.def("qmatmul_bf16(Tensor x, Tensor codes, Tensor scales, Tensor? offsets, int group) -> Tensor");
  m.def("i16_available() -> bool", &i16_available);
  m.def("amx_available() -> bool", &amx_available);
  m.def("amx_group_ok(int group) -> bool", &amx_group_ok);
  m.def("i16_pack(Tensor codes, Tensor scales, Tensor? offsets, int group, bool quads=False) -> (Tensor, Tensor, Tensor)");
  m.def("qmatmul_i16(Tensor x, Tensor wq, Tensor sw, Tensor ow, int group) -> Tensor");
  m.def("bf16_dot_available() -> bool", &bf16_dot_available);
  m.def("geglu(Tensor gate_up) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor y, Tensor? s1, Tensor? s2, float eps) -> (Tensor, Tensor)");
  m.def("qk_norm_rope(Tensor qkv, Tensor? q_scale, Tensor? k_scale, Tensor cos, Tensor sin, int hq, int hkv, "
        "float eps) -> (Tensor, Tensor, Tensor)");
  m.def("q8_head_available() -> bool", &q8_head_available);
  m.def("q8_head_pack(Tensor codes, Tensor scales) -> (Tensor, Tensor, Tensor)");
  m.def("q8_head(Tensor x, Tensor wq, Tensor sw, Tensor aw, Tensor codes, Tensor scales, bool want_logits) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor table, Tensor start, Tensor lengths, int block, "
        "int page_stride, float scale, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(gemma_sessions, CPU, m) {
  m.impl("qmatmul", &qmatmul);
  m.impl("rms_norm", &rms_norm);
  m.impl("argmax", &argmax_rows);
  m.impl("decode_stack", &decode_stack);
  m.impl("decode_attention", &decode_attention);
  m.impl("qmatmul_wide", &qmatmul_wide);
  m.impl("dequantize", &dequantize);
  m.impl("qmatmul_bf16", &qmatmul_bf16);
  m.impl("i16_pack", &i16_pack);
  m.impl("qmatmul_i16", &qmatmul_i16);
  m.impl("geglu", &geglu);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("qk_norm_rope", &qk_norm_rope);
  m.impl("q8_head_pack", &q8_head_pack);
  m.impl("q8_head", &q8_head);
}
