#pragma once
#include <cstdint>

namespace rela {

// Fisher-Yates permutation of [0, n) into out, driven by Xoshiro256(seed).
void permutation(int64_t n, uint64_t seed, int64_t* out);

// k distinct items of [0, n), uniformly: a partial Fisher-Yates. Output in draw order.
void uniform_subset(int64_t n, int64_t k, uint64_t seed, int64_t* out);

// k distinct items of [0, n) drawn without replacement with probability proportional to
// weights (successive sampling), in O(n): exponential keys E_i / w_i (Efraimidis-Spirakis),
// then the k smallest by a radix select. Items with weight 0 are never drawn. Output in index
// order. Keys come from a counter-based stream (item i's key depends only on seed and i), so the
// result is the same for any thread count. Returns false if fewer than k weights are positive.
bool weighted_subset(const float* weights, int64_t n, int64_t k, uint64_t seed, int threads,
                     int64_t* out);

}  // namespace rela
