#include "sampling.h"

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

}  // namespace rela
