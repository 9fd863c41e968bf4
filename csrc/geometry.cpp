#include "geometry.h"

#include <algorithm>
#include <cmath>
#include <random>

namespace rela {
namespace {

// numpy's SeedSequence constants (numpy/random/bit_generator.pyx).
constexpr uint32_t kInitA = 0x43b0d7e5, kMultA = 0x931e8875, kInitB = 0x8b51f9dd, kMultB = 0x58f38ded;
constexpr uint32_t kMixL = 0xca01f9dd, kMixR = 0x4973f715;
constexpr int kPool = 4, kShift = 16;

uint32_t hashmix(uint32_t value, uint32_t& hash_const) {
  value ^= hash_const;
  hash_const *= kMultA;
  value *= hash_const;
  return value ^ (value >> kShift);
}

uint32_t mix(uint32_t x, uint32_t y) {
  uint32_t r = kMixL * x - kMixR * y;
  return r ^ (r >> kShift);
}

// torch.rand((), generator=g) as a float32, then widened: 24 random bits of one 32-bit draw.
double uniform01(std::mt19937& g) { return static_cast<double>(static_cast<float>((g() & 0xFFFFFFu) * (1.0 / 16777216.0))); }

double uniform(std::mt19937& g, double lo, double hi) { return lo + (hi - lo) * uniform01(g); }

int round_even(double x) { return static_cast<int>(std::nearbyint(x)); }  // Python's round()

}  // namespace

uint32_t seed_sequence_word(const uint32_t* words, int n) {
  uint32_t pool[kPool];
  uint32_t hash_const = kInitA;
  for (int i = 0; i < kPool; ++i) pool[i] = hashmix(i < n ? words[i] : 0u, hash_const);
  for (int src = 0; src < kPool; ++src)
    for (int dst = 0; dst < kPool; ++dst)
      if (src != dst) pool[dst] = mix(pool[dst], hashmix(pool[src], hash_const));
  for (int src = kPool; src < n; ++src)
    for (int dst = 0; dst < kPool; ++dst) pool[dst] = mix(pool[dst], hashmix(words[src], hash_const));
  uint32_t h = kInitB, v = pool[0];  // generate_state's first word
  v ^= h;
  h *= kMultB;
  v *= h;
  return v ^ (v >> kShift);
}

// views.crop_params (torchvision's RandomResizedCrop.get_params on our generator) and
// views.geometry's flip, draw for draw: torch.randint(0, n) is one 32-bit draw modulo n.
void draw_geometry(uint32_t seed, int height, int width, const CropRule& rule, int32_t* box, uint8_t* flip) {
  std::mt19937 g(seed);  // torch's CPU generator: MT19937 seeded with the seed's low 32 bits
  int top, left, h, w;
  if (!rule.random) {
    const int m = std::min(height, width);
    top = (height - m) / 2, left = (width - m) / 2, h = m, w = m;
  } else {
    const double area = static_cast<double>(height) * width;
    const double lr0 = std::log(rule.ratio[0]), lr1 = std::log(rule.ratio[1]);
    bool found = false;
    for (int attempt = 0; attempt < 10 && !found; ++attempt) {
      const double target = area * uniform(g, rule.scale[0], rule.scale[1]);
      const double aspect = std::exp(uniform(g, lr0, lr1));
      w = round_even(std::sqrt(target * aspect));
      h = round_even(std::sqrt(target / aspect));
      if (0 < w && w <= width && 0 < h && h <= height) {
        top = static_cast<int>(g() % static_cast<uint32_t>(height - h + 1));
        left = static_cast<int>(g() % static_cast<uint32_t>(width - w + 1));
        found = true;
      }
    }
    if (!found) {  // central crop at the nearest allowed aspect
      const double in_ratio = static_cast<double>(width) / height;
      if (in_ratio < rule.ratio[0]) {
        w = width, h = round_even(width / rule.ratio[0]);
      } else if (in_ratio > rule.ratio[1]) {
        h = height, w = round_even(height * rule.ratio[1]);
      } else {
        w = width, h = height;
      }
      top = (height - h) / 2, left = (width - w) / 2;
    }
  }
  box[0] = top, box[1] = left, box[2] = h, box[3] = w;
  *flip = rule.flip != 0 && uniform01(g) < rule.flip;
}

}  // namespace rela
