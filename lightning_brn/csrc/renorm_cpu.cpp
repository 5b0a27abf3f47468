// Batch Renorm training step on the CPU: one operator with its own autograd node.
//
// Loaded by lightning_brn/cpu_kernels.py (built once per machine with torch.utils.cpp_extension) and called by
// lightning_brn.functional.batch_renorm (lightning_brn/routes/__init__.py has the table of routes): Route.CPP, eager
// training steps of float32/float64 CPU tensors, runs renorm_train (its autograd node is C++ too); Route.COMPILED_CPP,
// compiled graphs with microbatches, runs renorm_fwd / renorm_bwd (functional ops whose autograd formula,
// RenormFwdFunction, is C++ too; cpu_kernels.py registers their shapes for tracing). The maths is that of
// lightning_brn/algorithm.py, Algorithm 1 of Ioffe (2017):
//   per group g (a microbatch, or the whole batch) and channel c:
//     mean, biased var of x over the group;  sigma_B = sqrt(var + eps)
//     r = clip(sigma_B / sigma, 1/rmax, rmax),  d = clip((mean - mu) / sigma, -dmax, dmax)   (constants)
//     y = (x - mean) / sigma_B * (gamma r) + (beta + gamma d)
//   then, once per call, mu += alpha (mean over groups of mean - mu) and sigma += alpha (... sigma_B - sigma),
//   sigma stored as running_var = sigma^2 - eps (see algorithm.py).
// The backward is batchnorm's training backward with weight gamma r (r, d constant), per group; the
// gradients of gamma and beta follow by the chain rule: r dL/dw_eff + d dL/db_eff and dL/db_eff.
//
// Data layouts (each group is one contiguous block of numel / G elements in both):
//   planar: contiguous (N, C, L) with L = prod(spatial) > 1
//   rows:   M rows of C contiguous channels: channels_last(_3d) data, or (N, C) / L == 1
// Sums are taken in 16 vector lanes of the input type and flushed into double totals every 64 terms per
// lane, in two passes (mean, then centred squares); in the rows layout each chunk of 64 rows gets its own
// mean and centred squares (two passes over the cached chunk, one over memory), merged in double with Chan's
// formula. No float partial sum holds more than 64 terms, so float32 statistics stay close to float64 ones.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

#if defined(__GNUC__) || defined(__clang__)
#define LBRN_INLINE inline __attribute__((always_inline))
#else
#define LBRN_INLINE inline
#endif

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = kLanes * 64;  // values per float partial sum flush (64 per lane)
constexpr int64_t kRows = 64;            // rows per float partial sum flush in the rows layout

// ---- layout ---------------------------------------------------------------------------------------------

struct Layout {
  bool rows;      // rows layout (channels last); else planar
  int64_t N, C, L, G;
  int64_t per_group() const { return N / G; }  // examples per group
};

bool channels_last_dense(const at::Tensor& x) {
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

// x as one of the two layouts (a contiguous copy for anything else), and the layout.
std::tuple<at::Tensor, Layout> as_layout(const at::Tensor& x_in, int64_t groups) {
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const int64_t L = x_in.numel() / (N * C);
  if (x_in.is_contiguous()) return {x_in, Layout{L == 1, N, C, L, groups}};
  if (channels_last_dense(x_in)) return {x_in, Layout{true, N, C, L, groups}};
  return {x_in.contiguous(), Layout{L == 1, N, C, L, groups}};
}

// ---- reductions -----------------------------------------------------------------------------------------

enum class Sum { kPlain, kCentredSquares, kCentredProducts };

// The kLanes float partial sums as one double (a pairwise tree, short dependency chains), lanes reset to 0.
template <typename T>
LBRN_INLINE double flush_lanes(T* acc) {
  static_assert(kLanes == 16, "flush_lanes adds 16 lanes");
  double t[8];
  for (int64_t k = 0; k < 8; ++k) t[k] = static_cast<double>(acc[k]) + static_cast<double>(acc[k + 8]);
  for (int64_t k = 0; k < 4; ++k) t[k] += t[k + 4];
  for (int64_t k = 0; k < kLanes; ++k) acc[k] = T(0);
  return (t[0] + t[2]) + (t[1] + t[3]);
}

// Over i < n: sum p[i] (kPlain), sum (p[i] - m)^2 (kCentredSquares) or sum (p[i] - m) q[i] (kCentredProducts),
// in kLanes float lanes flushed into a double total every kBlock values.
template <Sum kKind, typename T>
LBRN_INLINE double lane_sum(const T* p, const T* q, int64_t n, T m) {
  auto term = [&](int64_t i) -> T {
    if constexpr (kKind == Sum::kPlain) return p[i];
    const T v = p[i] - m;
    if constexpr (kKind == Sum::kCentredSquares) return v * v;
    return v * q[i];
  };
  double total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    T acc[kLanes] = {};
    int64_t i = start;
    for (; i + kLanes <= end; i += kLanes)
      for (int64_t k = 0; k < kLanes; ++k) acc[k] += term(i + k);
    double s = 0;
    for (; i < end; ++i) s += term(i);
    total += s + flush_lanes(acc);
  }
  return total;
}

// The same sum over the rows n0 <= n < n1 of one channel of planar data (rows of length L, C * L apart). Short
// rows (L < kBlock) share the lanes across rows, flushed before a lane would exceed 64 terms, so a row of 49
// values (7 x 7 images) costs three vector steps instead of a horizontal reduction each.
template <Sum kKind, typename T>
LBRN_INLINE double channel_sum(const T* p, const T* q, int64_t n0, int64_t n1, int64_t row_stride, int64_t L, T m) {
  if (L >= kBlock) {
    double total = 0;
    for (int64_t n = n0; n < n1; ++n) total += lane_sum<kKind>(p + n * row_stride, q + n * row_stride, L, m);
    return total;
  }
  double total = 0, tail = 0;
  T acc[kLanes] = {};
  int64_t pending = 0;
  for (int64_t n = n0; n < n1; ++n) {
    if (pending + L > kBlock) {
      total += flush_lanes(acc);
      pending = 0;
    }
    const T* pr = p + n * row_stride;
    const T* qr = q + n * row_stride;
    auto term = [&](int64_t i) -> T {
      if constexpr (kKind == Sum::kPlain) return pr[i];
      const T v = pr[i] - m;
      if constexpr (kKind == Sum::kCentredSquares) return v * v;
      return v * qr[i];
    };
    int64_t i = 0;
    for (; i + kLanes <= L; i += kLanes)
      for (int64_t k = 0; k < kLanes; ++k) acc[k] += term(i + k);
    for (; i < L; ++i) tail += term(i);
    pending += L;
  }
  return total + flush_lanes(acc) + tail;
}

// channel_sum's kPlain sum of q and kCentredProducts sum of (p - m) q over short rows (L < kBlock) in one pass,
// each with the same lanes and flushes as channel_sum (so the same results).
template <typename T>
LBRN_INLINE void channel_sum_pair(const T* p, const T* q, int64_t n0, int64_t n1, int64_t row_stride, int64_t L, T m,
                             double* sum_q, double* sum_pq) {
  double total = 0, tail = 0, total_x = 0, tail_x = 0;
  T acc[kLanes] = {}, acc_x[kLanes] = {};
  int64_t pending = 0;
  for (int64_t n = n0; n < n1; ++n) {
    if (pending + L > kBlock) {
      total += flush_lanes(acc);
      total_x += flush_lanes(acc_x);
      pending = 0;
    }
    const T* __restrict__ pr = p + n * row_stride;
    const T* __restrict__ qr = q + n * row_stride;
    int64_t i = 0;
    for (; i + kLanes <= L; i += kLanes)
      for (int64_t k = 0; k < kLanes; ++k) acc[k] += qr[i + k];
    for (; i < L; ++i) tail += qr[i];
    i = 0;
    for (; i + kLanes <= L; i += kLanes)
      for (int64_t k = 0; k < kLanes; ++k) acc_x[k] += (pr[i + k] - m) * qr[i + k];
    for (; i < L; ++i) tail_x += (pr[i] - m) * qr[i];
    pending += L;
  }
  *sum_q = total + flush_lanes(acc) + tail;
  *sum_pq = total_x + flush_lanes(acc_x) + tail_x;
}

// Rows layout, one group of M <= kRows rows, channels [c0, c0 + w): mean and biased variance with one float
// partial sum per channel (at most kRows terms), written to mo and vo (w values each).
template <typename T>
void small_group_moments(const T* xg, int64_t C, int64_t c0, int64_t w, int64_t M, T* __restrict__ mo,
                         T* __restrict__ vo) {
  const T count = static_cast<T>(M);
  std::fill(mo, mo + w, T(0));
  std::fill(vo, vo + w, T(0));
  for (int64_t i = 0; i < M; ++i) {
    const T* __restrict__ row = xg + i * C + c0;
    for (int64_t c = 0; c < w; ++c) mo[c] += row[c];
  }
  for (int64_t c = 0; c < w; ++c) mo[c] = mo[c] / count;
  for (int64_t i = 0; i < M; ++i) {
    const T* __restrict__ row = xg + i * C + c0;
    for (int64_t c = 0; c < w; ++c) {
      const T v = row[c] - mo[c];
      vo[c] += v * v;
    }
  }
  for (int64_t c = 0; c < w; ++c) vo[c] = vo[c] / count;
}

// Rows start <= i < end of one group (rows C apart), channels [0, w) from xg: a[c] = sum_i (xg[i C + c] - m[c])^2,
// rows in order. The chunk is in cache (its first pass just read it): blocks of four cache lines of channels (64
// floats, 32 doubles) are summed in local accumulators that AVX-512's 32 vector registers hold, so the loop only
// loads and adds (a per-row sweep also loads and stores a[] for every row); the rest of w, per row.
template <typename T>
LBRN_INLINE void chunk_centred_squares(const T* xg, int64_t C, int64_t w, int64_t start, int64_t end,
                                       const T* __restrict__ m, T* __restrict__ a) {
  constexpr int64_t kB = 256 / static_cast<int64_t>(sizeof(T));  // four cache lines of channels
  int64_t cb = 0;
  for (; cb + kB <= w; cb += kB) {
    T acc[kB] = {};
    T mb[kB];
    for (int64_t k = 0; k < kB; ++k) mb[k] = m[cb + k];
    for (int64_t i = start; i < end; ++i) {
      const T* __restrict__ row = xg + i * C + cb;
      for (int64_t k = 0; k < kB; ++k) {
        const T v = row[k] - mb[k];
        acc[k] += v * v;
      }
    }
    for (int64_t k = 0; k < kB; ++k) a[cb + k] = acc[k];
  }
  if (cb == w) return;
  std::fill(a + cb, a + w, T(0));
  for (int64_t i = start; i < end; ++i) {
    const T* __restrict__ row = xg + i * C;
    for (int64_t c = cb; c < w; ++c) {
      const T v = row[c] - m[c];
      a[c] += v * v;
    }
  }
}

// Planar layout, block gc = g * C + c (the k rows of channel c in group g): mean and biased variance.
template <typename T>
LBRN_INLINE void planar_moments(const T* x, const Layout& lay, int64_t gc, T* mean, T* var) {
  const int64_t C = lay.C, L = lay.L, k = lay.per_group();
  const int64_t g = gc / C, c = gc % C;
  const double count = static_cast<double>(k) * static_cast<double>(L);
  const T* xc = x + c * L;
  const double s = channel_sum<Sum::kPlain>(xc, xc, g * k, (g + 1) * k, C * L, L, T(0));
  const T m = static_cast<T>(s / count);
  const double ss = channel_sum<Sum::kCentredSquares>(xc, xc, g * k, (g + 1) * k, C * L, L, m);
  *mean = m;
  *var = static_cast<T>(ss / count);
}

// Planar layout, block gc: sum of dy and of dy * (x - mean) over its rows (mean: the block's), as doubles.
template <typename T>
LBRN_INLINE void planar_grad_sums(const T* x, const T* dy, const Layout& lay, int64_t gc, T mean, double* sum_dy,
                                  double* sum_dyx) {
  const int64_t C = lay.C, L = lay.L, k = lay.per_group();
  const int64_t g = gc / C, c = gc % C;
  const T* xc = x + c * L;
  const T* dc = dy + c * L;
  if (L < kBlock) {
    channel_sum_pair<T>(xc, dc, g * k, (g + 1) * k, C * L, L, mean, sum_dy, sum_dyx);
    return;
  }
  double s = 0, sx = 0;  // long rows: both sums row by row, the second one over a row still in the L1 cache
  for (int64_t n = g * k; n < (g + 1) * k; ++n) {
    const T* xr = xc + n * C * L;
    const T* dr = dc + n * C * L;
    s += lane_sum<Sum::kPlain>(dr, dr, L, T(0));
    sx += lane_sum<Sum::kCentredProducts>(xr, dr, L, mean);
  }
  *sum_dy = s;
  *sum_dyx = sx;
}

// Rows per span of the rows layout's statistics: about 64k values (whole rows, a multiple of kRows), from the
// number of channels alone.
inline int64_t span_rows(int64_t C) {
  return std::max<int64_t>(kRows, (65536 / std::max<int64_t>(C, 1)) / kRows * kRows);
}

// Rows [start, end) of one group (C channels per row): each chunk of kRows rows gets its own mean and centred sum
// of squares (its second read hits the cache), merged into double moments with Chan's formula: mu, m2 (C each).
// acc, m: scratch of C values.
template <typename T>
void span_moments(const T* xg, int64_t C, int64_t start, int64_t end, double* mu, double* m2, T* acc, T* m) {
  std::fill(mu, mu + C, 0.0);
  std::fill(m2, m2 + C, 0.0);
  double n_a = 0;
  for (int64_t s0 = start; s0 < end; s0 += kRows) {
    const int64_t s1 = std::min(end, s0 + kRows);
    const T n_b = static_cast<T>(s1 - s0);
    std::fill(acc, acc + C, T(0));
    for (int64_t i = s0; i < s1; ++i) {
      const T* __restrict__ row = xg + i * C;
      T* __restrict__ a = acc;
      for (int64_t c = 0; c < C; ++c) a[c] += row[c];
    }
    for (int64_t c = 0; c < C; ++c) m[c] = acc[c] / n_b;
    chunk_centred_squares<T>(xg, C, C, s0, s1, m, acc);
    const double nb = static_cast<double>(s1 - s0), n = n_a + nb;
    const double f = nb / n, g2 = n_a * nb / n;
    for (int64_t c = 0; c < C; ++c) {
      const double delta = static_cast<double>(m[c]) - mu[c];
      mu[c] += delta * f;
      m2[c] += static_cast<double>(acc[c]) + delta * delta * g2;
    }
    n_a = n;
  }
}

// Per (group, channel) mean and biased variance. mean, var: (G, C).
template <typename T>
void group_stats(const T* x, const Layout& lay, T* mean, T* var) {
  const int64_t C = lay.C, L = lay.L, G = lay.G, k = lay.per_group();
  const double count = static_cast<double>(k) * static_cast<double>(L);
  if (!lay.rows) {
    at::parallel_for(0, G * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t gc = b; gc < e; ++gc) planar_moments<T>(x, lay, gc, mean + gc, var + gc);
    });
    return;
  }
  const int64_t M = k * L;  // rows per group
  if (M <= kRows) {  // small groups (reached when the record is on; else fused_small_groups runs)
    const int64_t grain = std::max<int64_t>(16, 4096 / std::max<int64_t>(M * G, 1));
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t g = 0; g < G; ++g) {
        small_group_moments<T>(x + g * M * C, C, c0, c1 - c0, M, mean + g * C + c0, var + g * C + c0);
      }
    });
    return;
  }
  // Each group's rows in spans of whole rows (all channels: contiguous memory, one thread per span), each span's
  // moments into double; then the spans merged in order. The spans depend on the shape only, not on the thread
  // count, and so do the results.
  const int64_t span = span_rows(C), S = (M + span - 1) / span;
  std::vector<double> mu(G * S * C), m2(G * S * C);
  at::parallel_for(0, G * S, 1, [&](int64_t b, int64_t e) {
    std::vector<T> acc(C), m(C);
    for (int64_t t = b; t < e; ++t) {
      const int64_t g = t / S, start = (t % S) * span;
      span_moments<T>(x + g * M * C, C, start, std::min(M, start + span), mu.data() + t * C, m2.data() + t * C,
                      acc.data(), m.data());
    }
  });
  at::parallel_for(0, G * C, 256, [&](int64_t b, int64_t e) {
    for (int64_t gc = b; gc < e; ++gc) {
      const int64_t g = gc / C, c = gc % C;
      double n_a = 0, mean_a = 0, m2_a = 0;
      for (int64_t s = 0; s < S; ++s) {  // Chan's formula, spans in order
        const double nb = static_cast<double>(std::min(M, (s + 1) * span) - s * span), n = n_a + nb;
        const int64_t i = (g * S + s) * C + c;
        const double delta = mu[i] - mean_a;
        mean_a += delta * (nb / n);
        m2_a += m2[i] + delta * delta * (n_a * nb / n);
        n_a = n;
      }
      mean[gc] = static_cast<T>(mean_a);
      var[gc] = static_cast<T>(m2_a / count);
    }
  });
}

// Per (group, channel) sum of dy and of dy * (x - mean), for the backward pass. sum_dy, sum_dyx: (G, C).
template <typename T>
void group_grad_sums(const T* x, const T* dy, const Layout& lay, const T* mean, T* sum_dy, T* sum_dyx) {
  const int64_t C = lay.C, L = lay.L, G = lay.G, k = lay.per_group();
  if (!lay.rows) {
    at::parallel_for(0, G * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t gc = b; gc < e; ++gc) {
        double s, sx;
        planar_grad_sums<T>(x, dy, lay, gc, mean[gc], &s, &sx);
        sum_dy[gc] = static_cast<T>(s);
        sum_dyx[gc] = static_cast<T>(sx);
      }
    });
    return;
  }
  const int64_t M = k * L;
  // as group_stats: spans of whole rows, one thread each, their sums added in order
  const int64_t span = span_rows(C), S = (M + span - 1) / span;
  std::vector<double> tot(G * S * C), totx(G * S * C);
  at::parallel_for(0, G * S, 1, [&](int64_t b, int64_t e) {
    std::vector<T> acc(C), accx(C);
    for (int64_t t = b; t < e; ++t) {
      const int64_t g = t / S, start = (t % S) * span, end = std::min(M, start + span);
      const T* xg = x + g * M * C;
      const T* dg = dy + g * M * C;
      const T* __restrict__ mr = mean + g * C;
      double* __restrict__ to = tot.data() + t * C;
      double* __restrict__ tx = totx.data() + t * C;
      for (int64_t s0 = start; s0 < end; s0 += kRows) {  // float partial sums of at most kRows terms
        const int64_t s1 = std::min(end, s0 + kRows);
        T* __restrict__ a = acc.data();
        T* __restrict__ ax = accx.data();
        std::fill(a, a + C, T(0));
        std::fill(ax, ax + C, T(0));
        for (int64_t i = s0; i < s1; ++i) {
          const T* __restrict__ xr = xg + i * C;
          const T* __restrict__ dr = dg + i * C;
          for (int64_t c = 0; c < C; ++c) {
            a[c] += dr[c];
            ax[c] += (xr[c] - mr[c]) * dr[c];
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          to[c] += a[c];
          tx[c] += ax[c];
        }
      }
    }
  });
  at::parallel_for(0, G * C, 256, [&](int64_t b, int64_t e) {
    for (int64_t gc = b; gc < e; ++gc) {
      const int64_t g = gc / C, c = gc % C;
      double sd = 0, sx = 0;
      for (int64_t s = 0; s < S; ++s) {
        sd += tot[(g * S + s) * C + c];
        sx += totx[(g * S + s) * C + c];
      }
      sum_dy[gc] = static_cast<T>(sd);
      sum_dyx[gc] = static_cast<T>(sx);
    }
  });
}

// ---- elementwise passes ---------------------------------------------------------------------------------

// Outputs larger than the caches are written with non-temporal stores (x86 with AVX-512, float32, rows of a
// multiple of 16 values on 64-byte boundaries): the stores bypass the caches, so the output's cache lines are
// not read from memory before being overwritten, a third less memory traffic for these passes. The arithmetic
// is the same (separate multiply and add, in the same order).
#if defined(__AVX512F__)
constexpr bool kHasStream = true;
#else
constexpr bool kHasStream = false;
#endif

// Outputs of at least half the L3 cache, and at most 16 MiB (16 MiB where its size is unknown; Linux sysfs), are
// streamed: most of such an output would be evicted before the next layer reads it anyway (glibc's memcpy uses a
// similar threshold). The cap: virtual machines report the host's L3 (hundreds of MiB on a 2-vCPU VM, where
// streaming large outputs sped the step up: bench/bench_layers.py), and an L3 is shared by all cores and tenants.
int64_t stream_bytes() {
  static const int64_t bytes = [] {
    int64_t l3 = 0;
    if (std::FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
      long value = 0;
      char unit = 0;
      if (std::fscanf(f, "%ld%c", &value, &unit) >= 1 && value > 0)
        l3 = static_cast<int64_t>(value) * (unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : 1);
      std::fclose(f);
    }
    const int64_t cap = int64_t(16) << 20;
    return l3 > 0 ? std::min(l3 / 2, cap) : cap;
  }();
  return bytes;
}

template <typename T>
bool use_stream(const T* out, int64_t row, int64_t numel) {
  return kHasStream && std::is_same_v<T, float> && row % 16 == 0 &&
         reinterpret_cast<std::uintptr_t>(out) % 64 == 0 && numel * static_cast<int64_t>(sizeof(T)) >= stream_bytes();
}

inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// o = x * a + b over n values; a, b per value (kScalar: a[0], b[0] for all)
template <bool kStream, bool kScalar, typename T>
LBRN_INLINE void affine_row(const T* __restrict__ x, T* __restrict__ o, const T* __restrict__ a,
                            const T* __restrict__ b, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (kStream && std::is_same_v<T, float>) {
    const __m512 av = _mm512_set1_ps(a[0]), bv = _mm512_set1_ps(b[0]);
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 ai = kScalar ? av : _mm512_loadu_ps(a + i);
      const __m512 bi = kScalar ? bv : _mm512_loadu_ps(b + i);
      _mm512_stream_ps(o + i, _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), ai), bi));
    }
    return;
  }
#endif
  if constexpr (kScalar) {
    const T av = a[0], bv = b[0];
    for (int64_t i = 0; i < n; ++i) o[i] = x[i] * av + bv;
  } else {
    for (int64_t i = 0; i < n; ++i) o[i] = x[i] * a[i] + b[i];
  }
}

// o = ((dy - md) - (x - m) * p) * sc over n values (batchnorm's input gradient); kScalar as above
template <bool kStream, bool kScalar, typename T>
LBRN_INLINE void grad_row(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ o,
                          const T* __restrict__ m, const T* __restrict__ md, const T* __restrict__ p,
                          const T* __restrict__ sc, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (kStream && std::is_same_v<T, float>) {
    const __m512 mv = _mm512_set1_ps(m[0]), mdv = _mm512_set1_ps(md[0]), pv = _mm512_set1_ps(p[0]),
                 sv = _mm512_set1_ps(sc[0]);
    for (int64_t i = 0; i < n; i += 16) {
      const __m512 mi = kScalar ? mv : _mm512_loadu_ps(m + i), mdi = kScalar ? mdv : _mm512_loadu_ps(md + i);
      const __m512 pi = kScalar ? pv : _mm512_loadu_ps(p + i), si = kScalar ? sv : _mm512_loadu_ps(sc + i);
      const __m512 centred = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), mi), pi);
      _mm512_stream_ps(o + i, _mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(dy + i), mdi), centred), si));
    }
    return;
  }
#endif
  if constexpr (kScalar) {
    const T mv = m[0], mdv = md[0], pv = p[0], sv = sc[0];
    for (int64_t i = 0; i < n; ++i) o[i] = ((dy[i] - mdv) - (x[i] - mv) * pv) * sv;
  } else {
    for (int64_t i = 0; i < n; ++i) o[i] = ((dy[i] - md[i]) - (x[i] - m[i]) * p[i]) * sc[i];
  }
}

// calls f(std::integral_constant<bool, stream>) with stream = use_stream(...)
template <typename T, typename F>
void with_stream(const T* out, int64_t row, int64_t numel, const F& f) {
  if (use_stream(out, row, numel)) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Walks the rows of an elementwise pass in memory order, in parallel: f(stream, scalar, i, p, n) for each row, with
// i its first element, p the offset of its (group, channel) constants and n its length. Planar rows are one
// (example, channel): L values sharing one constant (scalar: std::true_type). Channels-last rows are one position:
// C values, one constant per channel (scalar: std::false_type). stream: whether out is written with
// non-temporal stores (use_stream), fenced by each thread after its rows.
template <typename T, typename F>
void for_each_row(const T* out, const Layout& lay, const F& f) {
  const int64_t C = lay.C, L = lay.L, k = lay.per_group();
  with_stream(out, lay.rows ? C : L, lay.N * C * L, [&](auto stream) {
    if (!lay.rows) {
      at::parallel_for(0, lay.N * C, std::max<int64_t>(1, 32768 / L), [&](int64_t s, int64_t e) {
        int64_t n = s / C, c = s % C;  // (example, channel) of row nc, advanced without divisions
        int64_t off = (n / k) * C;
        for (int64_t nc = s; nc < e; ++nc) {
          f(stream, std::true_type{}, nc * L, off + c, L);
          if (++c == C) {
            c = 0;
            ++n;
            off = (n / k) * C;
          }
        }
        if (decltype(stream)::value) stream_fence();
      });
      return;
    }
    const int64_t rows_per_group = k * L;
    at::parallel_for(0, lay.N * L, std::max<int64_t>(1, 32768 / C), [&](int64_t s, int64_t e) {
      for (int64_t m = s; m < e; ++m) f(stream, std::false_type{}, m * C, (m / rows_per_group) * C, C);
      if (decltype(stream)::value) stream_fence();
    });
  });
}

// out = x * a[g, c] + b[g, c]
template <typename T>
void affine_pass(const T* x, T* out, const Layout& lay, const T* a, const T* b) {
  for_each_row(out, lay, [&](auto stream, auto scalar, int64_t i, int64_t p, int64_t n) {
    affine_row<decltype(stream)::value, decltype(scalar)::value>(x + i, out + i, a + p, b + p, n);
  });
}

// grad_x = ((dy - mdy[g, c]) - (x - mean[g, c]) * proj[g, c]) * scale[g, c]   (batchnorm's backward)
template <typename T>
void grad_input_pass(const T* x, const T* dy, T* gx, const Layout& lay, const T* mean, const T* mdy, const T* proj,
                     const T* scale) {
  for_each_row(gx, lay, [&](auto stream, auto scalar, int64_t i, int64_t p, int64_t n) {
    grad_row<decltype(stream)::value, decltype(scalar)::value>(x + i, dy + i, gx + i, mean + p, mdy + p, proj + p,
                                                               scale + p, n);
  });
}

// ---- the per-channel step -------------------------------------------------------------------------------

template <typename T>
inline T clip(T v, T lo, T hi) {
  // std::min(v, hi) is (hi < v ? hi : v) and std::max(m, lo) is (m < lo ? lo : m): NaN passes through, as with
  // torch.clamp, and both map onto the vector min/max instructions
  return std::max(std::min(v, hi), lo);
}

template <typename T>
inline T lerp(T a, T b, T w) {  // as aten's lerp
  return w < T(0.5) ? a + w * (b - a) : b - (b - a) * (T(1) - w);
}

// One group's r, d, effective affine, inverse std and sigma_B (C values each). inv_rs = 1 / sigma: one square
// root and one division per value (r and d multiply by 1 / sigma, computed once per channel and step).
template <typename T, bool kRunning, bool kWeight, bool kBias>
void step_row(const T* __restrict__ mean, const T* __restrict__ var, const T* __restrict__ inv_rs,
              const T* __restrict__ rm, const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ r,
              T* __restrict__ d, T* __restrict__ w_eff, T* __restrict__ b_eff, T* __restrict__ invstd,
              T* __restrict__ std_out, int64_t C, T eps, T rmin, T rmax, T dmax) {
  for (int64_t c = 0; c < C; ++c) {
    const T std_b = std::sqrt(var[c] + eps);
    T ri = T(1), di = T(0);
    if constexpr (kRunning) {
      ri = clip(std_b * inv_rs[c], rmin, rmax);
      di = clip((mean[c] - rm[c]) * inv_rs[c], -dmax, dmax);
    }
    T w = T(1), b = T(0);
    if constexpr (kWeight) w = weight[c];
    if constexpr (kBias) b = bias[c];
    r[c] = ri;
    d[c] = di;
    w_eff[c] = w * ri;
    b_eff[c] = b + w * di;
    invstd[c] = T(1) / std_b;
    std_out[c] = std_b;
  }
}

// From the (G, C) batch statistics: r, d, the effective affine and inverse std (all (G, C)); then the in-place
// moving-average update towards the mean over groups. running_mean == nullptr: no running statistics.
// On the two-pass paths the loops run over all channels innermost (contiguous), so they vectorize; the fused
// planar kernels call row() one channel at a time.
// The hyper-parameters and the moving averages as they were before this step (sigma = sqrt(running_var + eps)).
template <typename T>
struct Step {
  T rmin, rmax, dmax, eps, alpha;
  bool running;           // running statistics present: r, d from them, then the update
  bool update;            // running && momentum != 0
  const T* weight;        // (C,) or nullptr
  const T* bias;          // (C,) or nullptr
  std::vector<T> rs, rm;  // sigma and mu before the update, (C,)
  std::vector<T> inv_rs;  // 1 / sigma

  Step(double rmax_d, double dmax_d, double momentum_d, double eps_d, const T* w, const T* b, const T* running_mean,
       const T* running_var, int64_t C)
      : rmin(static_cast<T>(1.0 / rmax_d)),
        rmax(static_cast<T>(rmax_d)),
        dmax(static_cast<T>(dmax_d)),
        eps(static_cast<T>(eps_d)),
        alpha(static_cast<T>(momentum_d)),
        running(running_mean != nullptr),
        update(running_mean != nullptr && momentum_d != 0.0),
        weight(w),
        bias(b),
        rs(C, T(1)),
        rm(C, T(0)),
        inv_rs(C, T(1)) {
    if (running) {
      for (int64_t c = 0; c < C; ++c) {
        rs[c] = std::sqrt(running_var[c] + eps);
        rm[c] = running_mean[c];
        inv_rs[c] = T(1) / rs[c];
      }
    }
  }

  // r, d, effective affine, inverse std and sigma_B of channels [c0, c0 + w) of one group (mean, var, outputs
  // offset to c0)
  void row(const T* mean, const T* var, int64_t c0, int64_t w, T* r, T* d, T* w_eff, T* b_eff, T* invstd,
           T* std_b) const {
    auto call = [&](auto has_running, auto has_weight, auto has_bias) {
      step_row<T, decltype(has_running)::value, decltype(has_weight)::value, decltype(has_bias)::value>(
          mean, var, inv_rs.data() + c0, rm.data() + c0, weight ? weight + c0 : nullptr, bias ? bias + c0 : nullptr,
          r, d, w_eff, b_eff, invstd, std_b, w, eps, rmin, rmax, dmax);
    };
    using Yes = std::true_type;
    using No = std::false_type;
    auto with_bias = [&](auto run, auto wt) { bias ? call(run, wt, Yes{}) : call(run, wt, No{}); };
    auto with_weight = [&](auto run) { weight ? with_bias(run, Yes{}) : with_bias(run, No{}); };
    running ? with_weight(Yes{}) : with_weight(No{});
  }

  // adds one group's clipping record of channels [c0, c0 + w): r clipped, d clipped, sum |r - 1|, sum |d|
  void record(const T* mean, const T* std_b, const T* r, const T* d, int64_t c0, int64_t w, double* acc) const {
    for (int64_t c = 0; c < w; ++c) {
      acc[0] += (r[c] != std_b[c] * inv_rs[c0 + c]);
      acc[1] += (d[c] != (mean[c] - rm[c0 + c]) * inv_rs[c0 + c]);
      acc[2] += std::abs(r[c] - T(1));
      acc[3] += std::abs(d[c]);
    }
  }

  // the moving averages of channel c towards mean_b, std_b (the batch's, or the means over groups); a channel whose
  // statistics are not finite keeps its averages (returns false), so one bad batch cannot poison them for good
  bool update_channel(T* running_mean, T* running_var, int64_t c, T mean_b, T std_b) const {
    if (!(std::isfinite(mean_b) && std::isfinite(std_b))) return false;
    running_mean[c] = lerp(rm[c], mean_b, alpha);
    // sigma += alpha (sigma_B - sigma) =: sigma + delta, stored as sigma^2 - eps: var += delta (2 sigma + delta)
    const T delta = (std_b - rs[c]) * alpha;
    const T v = running_var[c] + (delta + T(2) * rs[c]) * delta;
    running_var[c] = v < T(0) ? T(0) : v;
    return true;
  }
};

// mean_sum += mean, std_sum += sigma_B over one group's channels (for the update over groups)
template <typename T>
void add_group_moments(const T* __restrict__ mean, const T* __restrict__ std_b, double* __restrict__ mean_sum,
                       double* __restrict__ std_sum, int64_t w) {
  for (int64_t c = 0; c < w; ++c) {
    mean_sum[c] += mean[c];
    std_sum[c] += std_b[c];
  }
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<T>() : nullptr;
}

// ---- small per-(group, channel) loops, pointers marked non-aliasing so they vectorize ---------------------

// scale = w_eff * invstd, shift = b_eff - mean * scale (the forward's affine form)
template <typename T>
void affine_constants(const T* __restrict__ w_eff, const T* __restrict__ b_eff, const T* __restrict__ invstd,
                      const T* __restrict__ mean, T* __restrict__ scale, T* __restrict__ shift, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    scale[i] = w_eff[i] * invstd[i];
    shift[i] = b_eff[i] - mean[i] * scale[i];
  }
}

// acc_w += (sum_dyx * invstd) * r + sum_dy * d;  acc_b += sum_dy   (one group's contribution)
template <typename T>
void affine_grads(const T* __restrict__ sum_dyx, const T* __restrict__ sum_dy, const T* __restrict__ invstd,
                  const T* __restrict__ r, const T* __restrict__ d, T* __restrict__ acc_w, T* __restrict__ acc_b,
                  int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    acc_w[i] += (sum_dyx[i] * invstd[i]) * r[i] + sum_dy[i] * d[i];
    acc_b[i] += sum_dy[i];
  }
}

// in place: sum_dyx -> proj = sum_dyx / m * invstd^2, sum_dy -> mean(dy); scale = invstd * w_eff, w_eff = weight r
template <typename T>
void input_grad_constants(T* __restrict__ sum_dyx, T* __restrict__ sum_dy, const T* __restrict__ invstd,
                          const T* __restrict__ r, const T* __restrict__ weight, T* __restrict__ scale, T m,
                          int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    sum_dyx[i] = sum_dyx[i] / m * invstd[i] * invstd[i];
    sum_dy[i] = sum_dy[i] / m;
    scale[i] = invstd[i] * (weight ? weight[i] * r[i] : r[i]);
  }
}

// Rows layout with groups of at most kRows rows ((N, C) features or tiny images in microbatches): per chunk of
// channels, each group's statistics, step and output in one go while its rows are in cache, so no (G, C)
// intermediate but the four saved vectors is written. Same arithmetic as the general path.
template <typename T>
void fused_small_groups(const T* x, T* out, const Layout& lay, const Step<T>& step, T* running_mean,
                        T* running_var, T* mean, T* invstd, T* r, T* d, std::atomic<int64_t>& skipped) {
  const int64_t C = lay.C, G = lay.G, M = lay.per_group() * lay.L;
  const int64_t grain = std::max<int64_t>(16, 4096 / std::max<int64_t>(M * G, 1));
  at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
    const int64_t w = c1 - c0;
    std::vector<T> var(w), std_b(w), w_eff(w), b_eff(w), scale(w), shift(w);
    std::vector<double> mean_sum(step.update ? w : 0, 0.0), std_sum(step.update ? w : 0, 0.0);
    for (int64_t g = 0; g < G; ++g) {
      const T* xg = x + g * M * C;
      T* og = out + g * M * C;
      T* mo = mean + g * C + c0;
      T* vo = var.data();
      small_group_moments<T>(xg, C, c0, w, M, mo, vo);
      const int64_t o = g * C + c0;
      step.row(mo, vo, c0, w, r + o, d + o, w_eff.data(), b_eff.data(), invstd + o, std_b.data());
      if (step.update) add_group_moments<T>(mo, std_b.data(), mean_sum.data(), std_sum.data(), w);
      affine_constants<T>(w_eff.data(), b_eff.data(), invstd + o, mo, scale.data(), shift.data(), w);
      const T* __restrict__ sc = scale.data();
      const T* __restrict__ sh = shift.data();
      for (int64_t i = 0; i < M; ++i) {
        const T* __restrict__ xr = xg + i * C + c0;
        T* __restrict__ orow = og + i * C + c0;
        for (int64_t c = 0; c < w; ++c) orow[c] = xr[c] * sc[c] + sh[c];
      }
    }
    if (step.update) {
      int64_t held = 0;
      for (int64_t c = 0; c < w; ++c) {
        if (G == 1) {
          held += !step.update_channel(running_mean, running_var, c0 + c, mean[c0 + c], std_b[c]);
        } else {
          held += !step.update_channel(running_mean, running_var, c0 + c, static_cast<T>(mean_sum[c] / G),
                                       static_cast<T>(std_sum[c] / G));
        }
      }
      if (held) skipped += held;
    }
  });
}

// The backward of fused_small_groups: per chunk of channels and group, the sums over the group's rows, the
// gradients of the weight and bias, and the input gradient of those rows while they are in cache. Same
// arithmetic as the general path (group_grad_sums, affine_grads, input_grad_constants, grad_input_pass).
template <typename T>
void fused_small_groups_backward(const T* x, const T* dy, const Layout& lay, const T* mean, const T* invstd,
                                 const T* r, const T* d, const T* weight, T* grad_x, T* grad_weight,
                                 T* grad_bias) {
  const int64_t C = lay.C, G = lay.G, M = lay.per_group() * lay.L;
  const T m = static_cast<T>(M);
  const int64_t grain = std::max<int64_t>(16, 4096 / std::max<int64_t>(M * G, 1));
  at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
    const int64_t w = c1 - c0;
    std::vector<T> sd(w), sx(w), scale(w), acc_w(w, T(0)), acc_b(w, T(0));
    for (int64_t g = 0; g < G; ++g) {
      const int64_t o = g * C + c0;
      const T* xg = x + g * M * C;
      const T* dg = dy + g * M * C;
      const T* __restrict__ mr = mean + o;
      T* __restrict__ so = sd.data();
      T* __restrict__ sxo = sx.data();
      std::fill(so, so + w, T(0));
      std::fill(sxo, sxo + w, T(0));
      for (int64_t i = 0; i < M; ++i) {
        const T* __restrict__ xr = xg + i * C + c0;
        const T* __restrict__ dr = dg + i * C + c0;
        for (int64_t c = 0; c < w; ++c) {
          so[c] += dr[c];
          sxo[c] += (xr[c] - mr[c]) * dr[c];
        }
      }
      affine_grads<T>(sxo, so, invstd + o, r + o, d + o, acc_w.data(), acc_b.data(), w);
      if (grad_x) {
        input_grad_constants<T>(sxo, so, invstd + o, r + o, weight ? weight + c0 : nullptr, scale.data(), m, w);
        const T* __restrict__ sc = scale.data();
        for (int64_t i = 0; i < M; ++i) {
          const T* __restrict__ xr = xg + i * C + c0;
          const T* __restrict__ dr = dg + i * C + c0;
          T* __restrict__ gr = grad_x + g * M * C + i * C + c0;
          for (int64_t c = 0; c < w; ++c) gr[c] = ((dr[c] - so[c]) - (xr[c] - mr[c]) * sxo[c]) * sc[c];
        }
      }
    }
    if (grad_weight) std::copy(acc_w.begin(), acc_w.end(), grad_weight + c0);
    if (grad_bias) std::copy(acc_b.begin(), acc_b.end(), grad_bias + c0);
  });
}

// Planar layout (NCHW and the like), one (group, channel) block at a time: its k rows of L values (C * L
// apart) give their statistics, the step of that channel and their output in one go, so the block is read
// from memory once and re-read from the cache; the general path's output pass reads the whole input a third
// time, from memory when it is larger than the caches. Same arithmetic as the general path (group_stats, then
// step_groups' rows, affine_constants and affine_pass), value for value; sigma_B goes to std_b for the update.
template <typename T>
void fused_planar(const T* x, T* out, const Layout& lay, const Step<T>& step, T* mean, T* invstd, T* r, T* d,
                  T* std_b) {
  const int64_t C = lay.C, L = lay.L, G = lay.G, k = lay.per_group();
  with_stream(out, L, lay.N * C * L, [&](auto stream) {
    at::parallel_for(0, G * C, std::max<int64_t>(1, 32768 / (k * L)), [&](int64_t b, int64_t e) {
      for (int64_t gc = b; gc < e; ++gc) {
        const int64_t g = gc / C, c = gc % C;
        T v, w_eff, b_eff, scale, shift;
        planar_moments<T>(x, lay, gc, mean + gc, &v);
        step.row(mean + gc, &v, c, 1, r + gc, d + gc, &w_eff, &b_eff, invstd + gc, std_b + gc);
        affine_constants<T>(&w_eff, &b_eff, invstd + gc, mean + gc, &scale, &shift, 1);
        for (int64_t n = g * k; n < (g + 1) * k; ++n) {
          const int64_t i = (n * C + c) * L;
          affine_row<decltype(stream)::value, true>(x + i, out + i, &scale, &shift, L);
        }
      }
      if (decltype(stream)::value) stream_fence();
    });
  });
}

// The backward of fused_planar: per (group, channel) block, the two sums, then the input gradient of the block
// while it is in cache. The weight and bias gradients add the blocks' terms over groups afterwards, in group
// order. Same arithmetic as the general path (group_grad_sums, affine_grads, input_grad_constants,
// grad_input_pass). term_w, term_b: (G, C) scratch.
template <typename T>
void fused_planar_backward(const T* x, const T* dy, const Layout& lay, const T* mean, const T* invstd, const T* r,
                           const T* d, const T* weight, T* grad_x, T* grad_weight, T* grad_bias, T* term_w,
                           T* term_b) {
  const int64_t C = lay.C, L = lay.L, G = lay.G, k = lay.per_group();
  const T m = static_cast<T>(k * L);
  with_stream(grad_x, L, grad_x ? lay.N * C * L : 0, [&](auto stream) {
    at::parallel_for(0, G * C, std::max<int64_t>(1, 16384 / (k * L)), [&](int64_t b, int64_t e) {
      for (int64_t gc = b; gc < e; ++gc) {
        const int64_t g = gc / C, c = gc % C;
        double s, sx;
        planar_grad_sums<T>(x, dy, lay, gc, mean[gc], &s, &sx);
        T sum_dy = static_cast<T>(s), sum_dyx = static_cast<T>(sx);
        term_w[gc] = T(0);
        term_b[gc] = T(0);
        affine_grads<T>(&sum_dyx, &sum_dy, invstd + gc, r + gc, d + gc, term_w + gc, term_b + gc, 1);
        if (!grad_x) continue;
        T scale;
        input_grad_constants<T>(&sum_dyx, &sum_dy, invstd + gc, r + gc, weight ? weight + c : nullptr, &scale, m, 1);
        for (int64_t n = g * k; n < (g + 1) * k; ++n) {
          const int64_t i = (n * C + c) * L;
          grad_row<decltype(stream)::value, true>(x + i, dy + i, grad_x + i, mean + gc, &sum_dy, &sum_dyx, &scale,
                                                  L);
        }
      }
      if (decltype(stream)::value) stream_fence();
    });
  });
  std::vector<T> acc_w(C, T(0)), acc_b(C, T(0));
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t c = 0; c < C; ++c) {
      acc_w[c] += term_w[g * C + c];
      acc_b[c] += term_b[g * C + c];
    }
  }
  if (grad_weight) std::copy(acc_w.begin(), acc_w.end(), grad_weight);
  if (grad_bias) std::copy(acc_b.begin(), acc_b.end(), grad_bias);
}

// Whether the planar fused kernels run: at least 4 (group, channel) blocks per thread, so that splitting the work
// by blocks loses little parallelism (the blocks are then split as parallel_for's grain allows: 32768 values per
// task at least, as the two-pass output pass).
inline bool use_fused_planar(const Layout& lay) {
  return !lay.rows && lay.G * lay.C >= 4 * static_cast<int64_t>(at::get_num_threads());
}

// After the step of all G groups: the clipping record (added to acc, group by group, when not null), then the
// moving averages' update towards the mean over the groups of the (G, C) batch means mp and sigmas sp.
template <typename T>
int64_t finish_groups(const Step<T>& step, const T* mp, const T* sp, const T* rp, const T* dp, int64_t G, int64_t C,
                      T* rmp, T* rvp, double* acc) {
  if (acc) {
    for (int64_t o = 0; o < G * C; o += C) step.record(mp + o, sp + o, rp + o, dp + o, 0, C, acc);
  }
  int64_t held = 0;
  if (!step.update) return held;
  if (G == 1) {
    for (int64_t c = 0; c < C; ++c) held += !step.update_channel(rmp, rvp, c, mp[c], sp[c]);
    return held;
  }
  std::vector<double> mean_sum(C, 0.0), std_sum(C, 0.0);
  for (int64_t g = 0; g < G; ++g) add_group_moments<T>(mp + g * C, sp + g * C, mean_sum.data(), std_sum.data(), C);
  for (int64_t c = 0; c < C; ++c)
    held += !step.update_channel(rmp, rvp, c, static_cast<T>(mean_sum[c] / G), static_cast<T>(std_sum[c] / G));
  return held;
}

// The step of all G groups from their (G, C) statistics: r, d, effective affine, inverse std and sigma_B
// (into sp), the clipping record (added to acc when not null), then the moving averages' update towards the mean
// over groups.
template <typename T>
int64_t step_groups(const Step<T>& step, const T* mp, const T* vp, int64_t G, int64_t C, T* rp, T* dp, T* wp,
                    T* bp, T* ip, T* sp, T* rmp, T* rvp, double* acc) {
  for (int64_t g = 0; g < G; ++g) {
    const int64_t o = g * C;
    step.row(mp + o, vp + o, 0, C, rp + o, dp + o, wp + o, bp + o, ip + o, sp + o);
  }
  return finish_groups<T>(step, mp, sp, rp, dp, G, C, rmp, rvp, acc);
}

// ---- autograd node ---------------------------------------------------------------------------------------

// The training forward: output and the saved (4, G, C) vectors (mean, invstd, r, d); the running statistics
// (when given, as raw pointers of the input's dtype) are updated in place and, when rec is not null, the
// clipping record (r clipped, d clipped, sum |r - 1|, sum |d|, G * C) is written to rec[0..5). x is returned in
// the layout the kernels used (a contiguous copy of non-dense input).
struct Forward {
  at::Tensor x, out, saved;
  int64_t held;  // channels whose moving averages were held (statistics not finite)
};

Forward forward_core(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, void* running_mean, void* running_var, double rmax,
                     double dmax, double momentum, double eps, int64_t groups, double* rec) {
  auto [x, lay] = as_layout(x_in, groups);
  const int64_t G = lay.G, C = lay.C, M = lay.per_group() * lay.L;
  auto opts = x.options();
  // saved for backward: (G, C) mean, invstd, r, d in one (4, G, C) tensor (plus x and the weight, as batchnorm)
  auto saved = at::empty({4, G, C}, opts);
  const bool has_running = running_mean != nullptr && running_var != nullptr;
  const bool want_record = has_running && rec != nullptr;
  auto out = at::empty_like(x);
  double acc[4] = {0, 0, 0, 0};
  std::atomic<int64_t> held{0};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_renorm_cpu_forward", [&] {
    using T = scalar_t;
    T* rmp = has_running ? static_cast<T*>(running_mean) : nullptr;
    T* rvp = has_running ? static_cast<T*>(running_var) : nullptr;
    const Step<T> step(rmax, dmax, momentum, eps, ptr_or_null<T>(weight), ptr_or_null<T>(bias), rmp, rvp, C);
    const T* xp = x.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    T* mp = saved.mutable_data_ptr<T>();
    T* ip = mp + G * C;
    T* rp = mp + 2 * G * C;
    T* dp = mp + 3 * G * C;
    if (lay.rows && M <= kRows && !want_record) {
      fused_small_groups<T>(xp, op, lay, step, rmp, rvp, mp, ip, rp, dp, held);
      return;
    }
    if (use_fused_planar(lay)) {
      std::vector<T> sp(G * C);  // sigma_B
      fused_planar<T>(xp, op, lay, step, mp, ip, rp, dp, sp.data());
      held += finish_groups<T>(step, mp, sp.data(), rp, dp, G, C, rmp, rvp, want_record ? acc : nullptr);
      return;
    }
    // general: statistics of every group, the step, the update, then one elementwise pass
    std::vector<T> scratch(5 * G * C);
    T* vp = scratch.data();
    T* wp = vp + G * C;
    T* bp = wp + G * C;
    T* sc = bp + G * C;
    T* sh = sc + G * C;
    group_stats<T>(xp, lay, mp, vp);
    held += step_groups<T>(step, mp, vp, G, C, rp, dp, wp, bp, ip, sc, rmp, rvp, want_record ? acc : nullptr);  // sc: sigma_B
    // y = x * scale + shift with scale = w_eff * invstd and shift = b_eff - mean * scale
    affine_constants<T>(wp, bp, ip, mp, sc, sh, G * C);
    affine_pass<T>(xp, op, lay, sc, sh);
  });
  if (want_record) {
    std::copy(acc, acc + 4, rec);
    rec[4] = static_cast<double>(G * C);
  }
  return {x, out, saved, held.load()};
}

// The training backward (batchnorm's with weight gamma r per group, r and d constants): grad_x, grad_weight,
// grad_bias, each computed only if asked for (undefined otherwise). saved: the forward's (4, G, C) vectors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_core(const at::Tensor& grad_out, const at::Tensor& x_in,
                                                             const std::optional<at::Tensor>& weight,
                                                             const at::Tensor& saved_in, int64_t groups,
                                                             bool need_x, bool need_w, bool need_b) {
  // x as the kernels read it (the saved x already is: no copy; a non-dense x from a direct call: a copy), and
  // dy in the same layout: channels-last rows exactly when x is channels-last dense and not contiguous
  auto [x, lay] = as_layout(x_in, groups);
  const bool cl = lay.rows && !x.is_contiguous();
  const at::Tensor dy = grad_out.contiguous(
      cl ? (x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d)
         : at::MemoryFormat::Contiguous);
  const at::Tensor saved = saved_in.contiguous();
  const int64_t G = lay.G, C = lay.C;
  at::Tensor grad_x, grad_weight, grad_bias;
  if (need_x) grad_x = at::empty_like(x);
  if (need_w) grad_weight = at::empty({C}, x.options());
  if (need_b) grad_bias = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_renorm_cpu_backward", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    const T* dp = dy.const_data_ptr<T>();
    const T* mp = saved.const_data_ptr<T>();
    const T* ip = mp + G * C;
    const T* rr = mp + 2 * G * C;
    const T* dd = mp + 3 * G * C;
    const T* wt = weight.has_value() && weight->defined() ? weight->const_data_ptr<T>() : nullptr;
    if (lay.rows && lay.per_group() * lay.L <= kRows) {
      fused_small_groups_backward<T>(xp, dp, lay, mp, ip, rr, dd, wt,
                                     need_x ? grad_x.mutable_data_ptr<T>() : nullptr,
                                     need_w ? grad_weight.mutable_data_ptr<T>() : nullptr,
                                     need_b ? grad_bias.mutable_data_ptr<T>() : nullptr);
      return;
    }
    if (use_fused_planar(lay)) {
      std::vector<T> terms(2 * G * C);
      fused_planar_backward<T>(xp, dp, lay, mp, ip, rr, dd, wt, need_x ? grad_x.mutable_data_ptr<T>() : nullptr,
                               need_w ? grad_weight.mutable_data_ptr<T>() : nullptr,
                               need_b ? grad_bias.mutable_data_ptr<T>() : nullptr, terms.data(),
                               terms.data() + G * C);
      return;
    }
    std::vector<T> sums(2 * G * C);
    T* sd = sums.data();
    T* sx = sd + G * C;
    group_grad_sums<T>(xp, dp, lay, mp, sd, sx);
    // dL/dw_eff = sum(dy * xhat) = sum_dyx * invstd;  dL/db_eff = sum_dy
    if (need_w || need_b) {
      T* gw = need_w ? grad_weight.mutable_data_ptr<T>() : nullptr;
      T* gb = need_b ? grad_bias.mutable_data_ptr<T>() : nullptr;
      std::vector<T> acc_w(C, T(0)), acc_b(C, T(0));  // sums over groups, channels innermost
      for (int64_t g = 0; g < G; ++g) {
        const int64_t o = g * C;
        affine_grads<T>(sx + o, sd + o, ip + o, rr + o, dd + o, acc_w.data(), acc_b.data(), C);
      }
      if (gw) std::copy(acc_w.begin(), acc_w.end(), gw);
      if (gb) std::copy(acc_b.begin(), acc_b.end(), gb);
    }
    if (need_x) {
      // batchnorm's input gradient per (group, channel): mdy = mean(dy), proj = invstd^2 mean(dy (x - mean)),
      // scale = invstd * w_eff. Reuse the sums' storage for mdy and proj; scale goes into a new vector.
      const T m = static_cast<T>(lay.per_group() * lay.L);
      std::vector<T> scale(G * C);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t o = g * C;
        input_grad_constants<T>(sx + o, sd + o, ip + o, rr + o, wt, scale.data() + o, m, C);
      }
      grad_input_pass<T>(xp, dp, grad_x.mutable_data_ptr<T>(), lay, mp, sd, sx, scale.data());
    }
  });
  return {grad_x, grad_weight, grad_bias};
}

// create_graph=True: these kernels have no derivative. The gradients get an error node whenever grad mode is on
// and anything they depend on (grad_out, x, the weight) requires grad, so asking for a second derivative fails
// loudly instead of silently being zero (Python's once_differentiable only looks at grad_out).
variable_list once_differentiable(variable_list grads, std::initializer_list<const at::Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return grads;
  bool any = false;
  for (const at::Tensor* t : inputs) any = any || (t->defined() && t->requires_grad());
  if (!any) return grads;
  for (auto& g : grads) {
    if (g.defined()) {
      g = g.detach();
      g.set_requires_grad(true);
    }
  }
  auto err = std::make_shared<torch::autograd::DelayedError>(
      "trying to differentiate twice a function that was marked with @once_differentiable "
      "(lightning_brn's batch renorm has no double backward)",
      static_cast<int64_t>(grads.size()));
  return (*err)(std::move(grads));
}

void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr() : nullptr;
}

struct RenormTrain : public torch::autograd::Function<RenormTrain> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var, double rmax, double dmax, double momentum,
                            double eps, int64_t groups, const std::optional<at::Tensor>& record,
                            const std::optional<at::Tensor>& nonfinite) {
    const bool want_record = record.has_value() && record->defined();
    double rec[5] = {0, 0, 0, 0, 0};
    void* rm = data_or_null(running_mean);
    void* rv = data_or_null(running_var);
    Forward f = forward_core(x_in, weight, bias, rv ? rm : nullptr, rm ? rv : nullptr, rmax, dmax, momentum, eps,
                             groups, want_record ? rec : nullptr);
    if (want_record && rm && rv) {
      record->copy_(at::from_blob(rec, {5}, at::TensorOptions().dtype(at::kDouble)));
    }
    if (f.held > 0 && nonfinite.has_value() && nonfinite->defined()) nonfinite->add_(1);  // one more batch held
    const bool has_weight = weight.has_value() && weight->defined();
    ctx->save_for_backward({f.x, f.saved, has_weight ? *weight : at::Tensor()});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["has_weight"] = has_weight;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    // running statistics were written through raw pointers: advance their version counters as in-place ops do
    if (rm && rv) {
      torch::autograd::impl::bump_version(*running_mean);
      torch::autograd::impl::bump_version(*running_var);
    }
    return f.out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    // needs_input_grad counts only the tensor arguments that were given: x, then weight and bias when present
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    std::optional<at::Tensor> weight;
    if (has_weight) weight = saved[2];
    auto [grad_x, grad_weight, grad_bias] =
        backward_core(grad_outputs[0], saved[0], weight, saved[1], ctx->saved_data["groups"].toInt(),
                      ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
                      has_bias && ctx->needs_input_grad(has_weight ? 2 : 1));
    const at::Tensor no_weight;
    variable_list grads = once_differentiable({grad_x, grad_weight, grad_bias},
                                              {&grad_outputs[0], &saved[0], has_weight ? &saved[2] : &no_weight});
    return {grads[0], grads[1], grads[2], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

void check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                  int64_t groups) {
  TORCH_CHECK(x.device().is_cpu(), "lightning_brn_cpu: CPU tensors only, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "lightning_brn_cpu: float32 or float64 input expected, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2 && x.numel() > 0 && groups >= 1 && x.size(0) % groups == 0,
              "lightning_brn_cpu: expected a non-empty (N, C, *) input whose batch size the number of groups divides, "
              "got shape ", x.sizes(), " and ", groups, " groups");
  const char* names[] = {"weight", "bias", "running_mean", "running_var"};
  int i = 0;
  for (const auto* t : {&weight, &bias, &running_mean, &running_var}) {
    const char* name = names[i++];
    if (t->has_value() && (*t)->defined()) {
      TORCH_CHECK((*t)->numel() == x.size(1), "lightning_brn_cpu: ", name, " should contain ", x.size(1),
                  " elements (one per channel of the input of shape ", x.sizes(), ") not ", (*t)->numel());
      TORCH_CHECK((*t)->scalar_type() == x.scalar_type() && (*t)->is_contiguous(), "lightning_brn_cpu: ", name,
                  " must be a contiguous (C,) tensor of the input dtype ", x.scalar_type(), ", got ",
                  (*t)->scalar_type(), (*t)->is_contiguous() ? "" : " (not contiguous)");
    }
  }
}

at::Tensor renorm_train(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                        const std::optional<at::Tensor>& running_var, double rmax, double dmax, double momentum,
                        double eps, int64_t groups, const std::optional<at::Tensor>& record,
                        const std::optional<at::Tensor>& nonfinite) {
  check_inputs(x, weight, bias, running_mean, running_var, groups);
  return RenormTrain::apply(x, weight, bias, running_mean, running_var, rmax, dmax, momentum, eps, groups, record,
                            nonfinite);
}

// Functional twins for compiled graphs (torch.compile): no in-place update. The forward returns the updated
// running statistics (the caller copies them into its buffers, which compilers handle as a buffer mutation)
// and the saved vectors, so a compiled backward can never recompute r and d from buffers this step already
// updated. Their autograd formula (RenormFwdFunction below) is C++ too, so a compiled step runs no Python
// besides the graph's own wrappers; lightning_brn/cpu_kernels.py registers their shapes for tracing.
using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// a one-element hyper-parameter tensor as a double (float64 CPU tensors, what the layers pass, are read directly)
double scalar_value(const at::Tensor& t) {
  if (t.device().is_cpu() && t.scalar_type() == at::kDouble && t.numel() == 1) return *t.const_data_ptr<double>();
  return t.item<double>();
}

// -> out, saved (4, G, C) = mean, invstd, r, d, running (2, C) = updated running mean and var, record (6,) float64:
// the clipping record (when asked for) and, always, the number of channels whose averages were held (not finite)
Tensors4 renorm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                    const at::Tensor& running_var, const at::Tensor& rmax, const at::Tensor& dmax,
                    const at::Tensor& momentum, double eps, int64_t groups, bool record) {
  check_inputs(x, weight, bias, running_mean, running_var, groups);
  const int64_t C = x.size(1);
  at::Tensor running = at::empty({2, C}, running_mean.options());  // a copy, updated below
  const size_t bytes = static_cast<size_t>(C) * running_mean.element_size();
  char* rp = static_cast<char*>(running.data_ptr());
  std::memcpy(rp, running_mean.const_data_ptr(), bytes);
  std::memcpy(rp + bytes, running_var.const_data_ptr(), bytes);
  at::Tensor rec = at::empty({6}, at::TensorOptions().dtype(at::kDouble));
  double* rec_p = rec.data_ptr<double>();
  std::fill(rec_p, rec_p + 6, 0.0);
  Forward f = forward_core(x, weight, bias, rp, rp + bytes, scalar_value(rmax), scalar_value(dmax),
                           scalar_value(momentum), eps, groups, record ? rec_p : nullptr);
  rec_p[5] = static_cast<double>(f.held);
  return Tensors4{f.out, f.saved, running, rec};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> renorm_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                          const std::optional<at::Tensor>& weight,
                                                          const at::Tensor& saved, int64_t groups) {
  check_inputs(x, weight, std::nullopt, std::nullopt, std::nullopt, groups);
  TORCH_CHECK(saved.dim() == 3 && saved.size(0) == 4 && saved.size(1) == groups && saved.size(2) == x.size(1) &&
                  saved.scalar_type() == x.scalar_type(),
              "lightning_brn_cpu::renorm_bwd: expected saved of shape (4, ", groups, ", ", x.size(1), ") and dtype ",
              x.scalar_type(), ", got ", saved.sizes(), " ", saved.scalar_type());
  return backward_core(grad_out, x, weight, saved, groups, true, true, true);
}

// The functional operators through the dispatcher, so that compilers trace the calls (handles looked up once).
const c10::TypedOperatorHandle<decltype(renorm_fwd)>& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lightning_brn_cpu::renorm_fwd", "").typed<decltype(renorm_fwd)>();
  return op;
}

const c10::TypedOperatorHandle<decltype(renorm_bwd)>& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lightning_brn_cpu::renorm_bwd", "").typed<decltype(renorm_bwd)>();
  return op;
}

// The autograd formula of renorm_fwd: the output's gradient through renorm_bwd (called through the dispatcher,
// so compilers trace it into the backward graph); saved, running and record are not differentiable.
struct RenormFwdFunction : public torch::autograd::Function<RenormFwdFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                               const at::Tensor& running_var, const at::Tensor& rmax, const at::Tensor& dmax,
                               const at::Tensor& momentum, double eps, int64_t groups, bool record) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, saved, running, rec] =
        fwd_op().call(x, weight, bias, running_mean, running_var, rmax, dmax, momentum, eps, groups, record);
    const bool has_weight = weight.has_value() && weight->defined();
    ctx->save_for_backward({x, saved, has_weight ? *weight : at::Tensor()});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["has_weight"] = has_weight;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({saved, running, rec});
    return {out, saved, running, rec};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list none(11);
    if (!grad_outputs[0].defined()) return none;
    auto saved = ctx->get_saved_variables();
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    std::optional<at::Tensor> weight;
    if (has_weight) weight = saved[2];
    // through renorm_bwd's Autograd kernel, which gives the gradients an error node if a second derivative is asked for
    auto [grad_x, grad_weight, grad_bias] =
        bwd_op().call(grad_outputs[0], saved[0], weight, saved[1], ctx->saved_data["groups"].toInt());
    none[0] = grad_x;
    if (has_weight) none[1] = grad_weight;
    if (has_bias) none[2] = grad_bias;
    return none;
  }
};

// renorm_bwd's Autograd kernel: the gradients have no derivative (an error node if one is asked for).
std::tuple<at::Tensor, at::Tensor, at::Tensor> renorm_bwd_autograd(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const at::Tensor& saved, int64_t groups) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = bwd_op().call(grad_out, x, weight, saved, groups);
  }
  const at::Tensor no_weight;
  variable_list grads = once_differentiable({std::get<0>(out), std::get<1>(out), std::get<2>(out)},
                                            {&grad_out, &x, &saved, weight.has_value() ? &*weight : &no_weight});
  return {grads[0], grads[1], grads[2]};
}

Tensors4 renorm_fwd_autograd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                             const at::Tensor& running_var, const at::Tensor& rmax, const at::Tensor& dmax,
                             const at::Tensor& momentum, double eps, int64_t groups, bool record) {
  const bool any_grad = x.requires_grad() || (weight.has_value() && weight->defined() && weight->requires_grad()) ||
                        (bias.has_value() && bias->defined() && bias->requires_grad());
  if (!at::GradMode::is_enabled() || !any_grad) {
    // nothing to differentiate (a compiled graph's forward runs here, under no_grad): no autograd node
    at::AutoDispatchBelowADInplaceOrView guard;
    return fwd_op().call(x, weight, bias, running_mean, running_var, rmax, dmax, momentum, eps, groups, record);
  }
  auto outs = RenormFwdFunction::apply(x, weight, bias, running_mean, running_var, rmax, dmax, momentum, eps, groups,
                                       record);
  return Tensors4{outs[0], outs[1], outs[2], outs[3]};
}

}  // namespace

TORCH_LIBRARY(lightning_brn_cpu, m) {
  m.def(
      "renorm_train(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "float rmax, float dmax, float momentum, float eps, int groups, Tensor(c!)? record, Tensor(d!)? nonfinite=None) "
      "-> Tensor");
  m.def(
      "renorm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, Tensor rmax, "
      "Tensor dmax, Tensor momentum, float eps, int groups, bool record) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "renorm_bwd(Tensor grad_out, Tensor x, Tensor? weight, Tensor saved, int groups) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lightning_brn_cpu, CPU, m) {
  m.impl("renorm_fwd", &renorm_fwd);
  m.impl("renorm_bwd", &renorm_bwd);
}

TORCH_LIBRARY_IMPL(lightning_brn_cpu, Autograd, m) {
  m.impl("renorm_fwd", &renorm_fwd_autograd);
  m.impl("renorm_bwd", &renorm_bwd_autograd);
}

TORCH_LIBRARY_IMPL(lightning_brn_cpu, CompositeImplicitAutograd, m) { m.impl("renorm_train", &renorm_train); }
