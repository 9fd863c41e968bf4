#pragma once
#include <cstdint>

namespace rela {

// Fisher-Yates permutation of [0, n) into out, driven by Xoshiro256(seed).
void permutation(int64_t n, uint64_t seed, int64_t* out);

}  // namespace rela
