#include "sampling.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "rng.h"

namespace rela {

void permutation(int64_t n, uint64_t seed, int64_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = i;
  Xoshiro256 rng(seed);
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
    const int64_t tmp = out[i];
    out[i] = out[j];
    out[j] = tmp;
  }
}

void uniform_subset(int64_t n, int64_t k, uint64_t seed, int64_t* out) {
  std::vector<int64_t> pool(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) pool[i] = i;
  Xoshiro256 rng(seed);
  for (int64_t i = 0; i < k; ++i) {
    const int64_t j = i + static_cast<int64_t>(rng.below(static_cast<uint64_t>(n - i)));
    std::swap(pool[i], pool[j]);
    out[i] = pool[i];
  }
}

namespace {

constexpr int kBits = 16;  // radix-select bucket: top 16 bits of the key's ordered encoding
constexpr int kBuckets = 1 << kBits;
constexpr uint32_t kInf = 0xFFFFFFFFu;  // encoding reserved for weight <= 0 (never drawn)

// Item i's Exp(1) variate: splitmix64 output at counter i, mapped to (0, 1], then -log.
inline float exp_variate(uint64_t seed, int64_t i) {
  uint64_t state = seed + static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ULL;
  const uint64_t x = splitmix64(state);
  const double u = static_cast<double>((x >> 11) + 1) * 0x1.0p-53;
  return static_cast<float>(-std::log(u)) + 0.0f;  // + 0.0f turns -0.0 (u == 1) into +0.0
}

// Non-negative floats (+0.0 up to +inf) order like their bit patterns.
inline uint32_t encode(float key) {
  uint32_t b;
  std::memcpy(&b, &key, sizeof b);
  return b;
}

template <class F>
void parallel_for(int64_t n, int threads, F&& body) {
  if (threads <= 1 || n < (1 << 16)) {
    body(0, int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t step = (n + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const int64_t lo = std::min(n, t * step), hi = std::min(n, lo + step);
    pool.emplace_back([&body, t, lo, hi] { body(t, lo, hi); });
  }
  for (auto& th : pool) th.join();
}

}  // namespace

bool weighted_subset(const float* weights, int64_t n, int64_t k, uint64_t seed, int threads,
                     int64_t* out) {
  if (k <= 0) return true;
  threads = std::max(1, threads);
  const uint64_t mixed_seed = [&] { uint64_t s = seed; return splitmix64(s); }();
  std::vector<uint32_t> code(static_cast<size_t>(n));
  std::vector<std::array<uint32_t, kBuckets + 1>> hist(static_cast<size_t>(threads));

  // Pass 1: keys and a per-thread histogram of their top bits.
  parallel_for(n, threads, [&](int t, int64_t lo, int64_t hi) {
    auto& h = hist[t];
    h.fill(0);
    for (int64_t i = lo; i < hi; ++i) {
      const float w = weights[i];
      uint32_t c = kInf;
      if (w > 0.0f && std::isfinite(w)) {
        c = encode(exp_variate(mixed_seed, i) / w);  // <= 0x7F800000 (+inf): never kInf
        ++h[c >> (32 - kBits)];
      } else {
        ++h[kBuckets];
      }
      code[i] = c;
    }
  });
  std::array<int64_t, kBuckets + 1> total{};
  for (auto& h : hist)
    for (int b = 0; b <= kBuckets; ++b) total[b] += h[b];
  if (n - total[kBuckets] < k) return false;

  // The bucket holding the k-th smallest key; everything below it is in.
  int64_t below = 0;
  int pivot = 0;
  while (below + total[pivot] < k) below += total[pivot++];
  const int64_t need = k - below;  // how many to take from the pivot bucket

  // Pass 2: each thread collects its slice's pivot-bucket members and counts its slice's items
  // below the pivot; slices are concatenated in order, so the result doesn't depend on threads.
  const uint32_t pivot_lo = static_cast<uint32_t>(pivot) << (32 - kBits);
  const uint32_t pivot_hi = pivot_lo + ((1u << (32 - kBits)) - 1);
  std::vector<std::vector<std::pair<uint32_t, int64_t>>> edges(static_cast<size_t>(threads));
  std::vector<int64_t> lows(static_cast<size_t>(threads), 0);
  std::vector<int64_t> starts(static_cast<size_t>(threads) + 1, 0);
  parallel_for(n, threads, [&](int t, int64_t lo, int64_t hi) {
    auto& e = edges[t];
    int64_t below_count = 0;
    for (int64_t i = lo; i < hi; ++i) {
      const uint32_t c = code[i];
      below_count += (c < pivot_lo);  // branch-free: this test is a coin flip
      if (c - pivot_lo <= pivot_hi - pivot_lo) e.emplace_back(c, i);  // rare
    }
    lows[t] = below_count;
  });
  std::vector<std::pair<uint32_t, int64_t>> edge;
  edge.reserve(static_cast<size_t>(total[pivot]));
  for (auto& e : edges) edge.insert(edge.end(), e.begin(), e.end());
  std::nth_element(edge.begin(), edge.begin() + (need - 1), edge.end());
  const auto cut = edge[static_cast<size_t>(need - 1)];

  // Pass 3: write the chosen items in index order, each thread at its own offset. An item is in
  // if its key is below the pivot bucket, or in it with (key, index) <= the cut.
  std::vector<int64_t> taken(static_cast<size_t>(threads), 0);
  for (size_t t = 0; t < edges.size(); ++t) {
    int64_t c = lows[t];
    for (const auto& p : edges[t]) c += (p <= cut);
    taken[t] = c;
  }
  for (size_t t = 0; t < taken.size(); ++t) starts[t + 1] = starts[t] + taken[t];
  parallel_for(n, threads, [&](int t, int64_t lo, int64_t hi) {
    // Branch-free write: always store, advance only when taken; a store past this slice's
    // end goes to a sink instead of the next thread's first slot.
    int64_t w = starts[t];
    const int64_t end = starts[t + 1];
    int64_t sink;
    for (int64_t i = lo; i < hi; ++i) {
      const uint32_t c = code[i];
      bool take = c < pivot_lo;
      if (c - pivot_lo <= pivot_hi - pivot_lo) take = std::make_pair(c, i) <= cut;  // rare
      *(w < end ? &out[w] : &sink) = i;
      w += take;
    }
  });
  const int64_t w = starts[taken.size()];
  return w == k;
}

}  // namespace rela
