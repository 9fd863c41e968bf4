// The colour half of a view (see views.h): ColorJitter in its drawn order, grayscale, Gaussian
// blur, solarise — each the same float32 computation torchvision.transforms.v2 runs on a uint8
// tensor, per pixel instead of per op over whole tensors, so one image stays in cache.
#include "views.h"

#include <algorithm>
#include <cmath>
#include <vector>

// The helpers are inlined into colour_image, which is compiled twice (AVX2 and baseline x86-64)
// and picked at load time: the same arithmetic, so the same pixels, 8 floats per instruction.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define ALWAYS_INLINE __attribute__((always_inline)) inline
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ALWAYS_INLINE inline
#define CLONES
#endif

namespace rela {
namespace {

constexpr float kR = 0.2989f, kG = 0.587f, kB = 0.114f;  // torchvision's rgb_to_grayscale weights

// Max, min and clamp by value (std::max returns a reference: a branch that blocks vectorising).
inline float vmax(float a, float b) { return a > b ? a : b; }
inline float vmin(float a, float b) { return a < b ? a : b; }
inline float clamp(float v, float lo, float hi) { return vmin(vmax(v, lo), hi); }

inline uint8_t to_u8(float v) {  // clamp_(0, 255) then .to(uint8): truncation
  return static_cast<uint8_t>(clamp(v, 0.0f, 255.0f));
}

// r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114) in float32. ATen's AVX2 loop fuses the
// multiply-adds; plain arithmetic here (an FMA without hardware support is a libm call per pixel)
// differs from it by at most an ulp, i.e. rarely one grey level after truncation.
inline float gray(float r, float g, float b) { return (r * kR + g * kG) + b * kB; }

// floor of a non-negative float (every value floored here is a grey level in [0, 255]).
inline float floor_pos(float v) { return static_cast<float>(static_cast<int>(v)); }

// Round half to even, as torch.round, for |v| < 2^22: vectorisable, unlike a libm call.
inline float round_even(float v) {
  const float magic = 12582912.0f;  // 1.5 · 2^23
  const float t = v + magic;  // not folded away: without -ffast-math the compiler keeps IEEE order
  return t - magic;
}

struct Planes {
  uint8_t *r, *g, *b;
  size_t n;
};

ALWAYS_INLINE void brightness(Planes p, float f) {
  for (uint8_t* c : {p.r, p.g, p.b})
    for (size_t i = 0; i < p.n; ++i) c[i] = to_u8(static_cast<float>(c[i]) * f);
}

// _blend(image, other, f) = image·f + other·(1 − f), clamped, truncated.
inline uint8_t blend(uint8_t x, float other, float f, float one_minus_f) {
  return to_u8(static_cast<float>(x) * f + other * one_minus_f);
}

ALWAYS_INLINE void contrast(Planes p, float f) {
  int64_t sum = 0;  // the mean of the floored grayscale image: whole numbers, summed exactly
  for (size_t i = 0; i < p.n; ++i) sum += static_cast<int32_t>(gray(p.r[i], p.g[i], p.b[i]));
  const float mean = static_cast<float>(static_cast<double>(sum) / static_cast<double>(p.n));
  const float one_minus_f = 1.0f - f;
  for (uint8_t* c : {p.r, p.g, p.b})
    for (size_t i = 0; i < p.n; ++i) c[i] = blend(c[i], mean, f, one_minus_f);
}

ALWAYS_INLINE void saturation(Planes p, float f) {
  const float one_minus_f = 1.0f - f;
  for (size_t i = 0; i < p.n; ++i) {
    const float l = floor_pos(gray(p.r[i], p.g[i], p.b[i]));
    p.r[i] = blend(p.r[i], l, f, one_minus_f);
    p.g[i] = blend(p.g[i], l, f, one_minus_f);
    p.b[i] = blend(p.b[i], l, f, one_minus_f);
  }
}

// adjust_hue_image: to float [0, 1], _rgb_to_hsv, h = (h + shift) mod 1, _hsv_to_rgb, ×255.999 → uint8.
// In chunks: uint8 → float, the float math (a pure float loop, so it vectorises), float → uint8.
ALWAYS_INLINE void hue(Planes p, float shift) {
  constexpr size_t kChunk = 512;
  const float inv255 = static_cast<float>(1.0 / 255.0), sixth = static_cast<float>(1.0 / 6.0);
  const float scale = 255.0f + 1.0f - 1e-3f;
  float R[kChunk], G[kChunk], B[kChunk];
  for (size_t at = 0; at < p.n; at += kChunk) {
    const size_t m = std::min(kChunk, p.n - at);
    for (size_t i = 0; i < m; ++i) {
      R[i] = p.r[at + i] * inv255;
      G[i] = p.g[at + i] * inv255;
      B[i] = p.b[at + i] * inv255;
    }
    for (size_t i = 0; i < m; ++i) {
      const float r = R[i], g = G[i], b = B[i];
      const float maxc = vmax(r, vmax(g, b)), minc = vmin(r, vmin(g, b));
      // Masks as floats and selects on comparisons (no bool temporaries): the loop vectorises.
      const float range = maxc - minc;
      const float s = range / (maxc == minc ? 1.0f : maxc);
      const float div = maxc == minc ? 1.0f : range;  // torch.where(eqc, ones, ...)
      const float rc = (maxc - r) / div, gc = (maxc - g) / div, bc = (maxc - b) / div;
      const float eq_r = maxc == r ? 1.0f : 0.0f, eq_g = maxc == g ? 1.0f : 0.0f;
      const float hg = (rc + 2.0f - bc) * (eq_g * (1.0f - eq_r));
      const float hr = (bc - gc) * eq_r;
      const float hb = (gc + 4.0f - rc) * ((1.0f - eq_r) * (1.0f - eq_g));
      float h = (hr + hg + hb) * sixth + 1.0f;  // in [0, 2): fmod(h, 1) is h − ⌊h⌋, exactly
      h = h - floor_pos(h);
      h = h + shift;                            // in [−0.5, 1.5): torch.remainder(h, 1.0) = h − ⌊h⌋
      h = h < 0.0f ? h + 1.0f : (h >= 1.0f ? h - 1.0f : h);
      const float h6 = h * 6.0f, fi = floor_pos(h6), fr = h6 - fi;
      const float k = fi >= 6.0f ? fi - 6.0f : fi;  // i mod 6 for h6 in [0, 6]
      const float v = maxc, sxf = s * fr, oms = 1.0f - s;
      const float q = clamp((1.0f - sxf) * v, 0.0f, 1.0f);
      const float t = clamp((sxf + oms) * v, 0.0f, 1.0f);
      const float pp = clamp(oms * v, 0.0f, 1.0f);
      // torchvision's select table, as selects: r = [v q p p t v], g = [t v v q p p], b = [p p t v v q]
      // One sector mask is 1 and the others 0, so each sum picks its value exactly, without branches.
      const float m0 = k == 0.0f ? 1.0f : 0.0f, m1 = k == 1.0f ? 1.0f : 0.0f, m2 = k == 2.0f ? 1.0f : 0.0f;
      const float m3 = k == 3.0f ? 1.0f : 0.0f, m4 = k == 4.0f ? 1.0f : 0.0f, m5 = k == 5.0f ? 1.0f : 0.0f;
      const float ro = v * (m0 + m5) + q * m1 + pp * (m2 + m3) + t * m4;
      const float go = t * m0 + v * (m1 + m2) + q * m3 + pp * (m4 + m5);
      const float bo = pp * (m0 + m1) + t * m2 + v * (m3 + m4) + q * m5;
      R[i] = ro * scale;
      G[i] = go * scale;
      B[i] = bo * scale;
    }
    for (size_t i = 0; i < m; ++i) {
      p.r[at + i] = static_cast<uint8_t>(R[i]);
      p.g[at + i] = static_cast<uint8_t>(G[i]);
      p.b[at + i] = static_cast<uint8_t>(B[i]);
    }
  }
}

ALWAYS_INLINE void grayscale(Planes p) {
  for (size_t i = 0; i < p.n; ++i) {
    const uint8_t l = static_cast<uint8_t>(gray(p.r[i], p.g[i], p.b[i]));  // .to(uint8) of a value in [0, 255]
    p.r[i] = p.g[i] = p.b[i] = l;
  }
}

// torchvision's _get_gaussian_kernel1d: softmax(−(x/σ)²) over x = linspace(−lim, lim, k),
// lim = (k − 1)/(2√2).
std::vector<float> gaussian_kernel(int k, double sigma) {
  std::vector<double> x(k), e(k);
  const double lim = (k - 1) / (2.0 * std::sqrt(2.0));
  double total = 0;
  for (int i = 0; i < k; ++i) {
    x[i] = k == 1 ? 0.0 : -lim + 2.0 * lim * i / (k - 1);
    e[i] = std::exp(-(x[i] / sigma) * (x[i] / sigma));
    total += e[i];
  }
  std::vector<float> out(k);
  for (int i = 0; i < k; ++i) out[i] = static_cast<float>(e[i] / total);
  return out;
}

inline int reflect(int i, int n) { return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i); }

// gaussian_blur_image with kernel size min(2⌈3σ⌉ + 1, largest odd < min(h, w)), reflect padding;
// separable (two 1-D passes instead of one 2-D convolution: float sums in another order), then
// round half to even. Rows are padded into a buffer first so the inner loops have no branches.
ALWAYS_INLINE void blur(uint8_t* plane, int h, int w, const std::vector<float>& k1, std::vector<float>& tmp,
          std::vector<float>& row) {
  const int k = static_cast<int>(k1.size()), r = k / 2;
  tmp.assign(static_cast<size_t>(h) * w, 0.0f);
  row.resize(static_cast<size_t>(w) + 2 * r);
  for (int y = 0; y < h; ++y) {
    const uint8_t* src = plane + static_cast<size_t>(y) * w;
    for (int x = -r; x < w + r; ++x) row[x + r] = src[reflect(x, w)];
    float* out = tmp.data() + static_cast<size_t>(y) * w;
    for (int j = 0; j < k; ++j) {
      const float kj = k1[j];
      const float* in = row.data() + j;
      for (int x = 0; x < w; ++x) out[x] += kj * in[x];
    }
  }
  std::vector<float>& acc = row;
  acc.resize(static_cast<size_t>(w));
  for (int y = 0; y < h; ++y) {
    std::fill(acc.begin(), acc.begin() + w, 0.0f);
    for (int j = 0; j < k; ++j) {
      const float kj = k1[j];
      const float* in = tmp.data() + static_cast<size_t>(reflect(y + j - r, h)) * w;
      for (int x = 0; x < w; ++x) acc[x] += kj * in[x];
    }
    uint8_t* dst = plane + static_cast<size_t>(y) * w;
    for (int x = 0; x < w; ++x) dst[x] = static_cast<uint8_t>(clamp(round_even(acc[x]), 0.0f, 255.0f));
  }
}

ALWAYS_INLINE void solarize(Planes p) {
  for (uint8_t* c : {p.r, p.g, p.b})
    for (size_t i = 0; i < p.n; ++i) c[i] = c[i] >= 128 ? static_cast<uint8_t>(255 - c[i]) : c[i];
}

}  // namespace

// The params layout (see views.h). Adding an op: a slot here, its entry in colour_layout(), its
// function above and its call in colour_image.
namespace slot {
constexpr int kJitterCount = 0, kJitterOps = 1, kMaxJitter = 4;
constexpr int kGray = 9;       // 0/1
constexpr int kSigma = 10;     // blur sigma, 0 = none
constexpr int kSolarize = 11;  // 0/1
constexpr int kSize = 12;
}  // namespace slot
enum JitterOp { kBrightness = 1, kContrast = 2, kSaturation = 3, kHue = 4 };

const ColourLayout& colour_layout() {
  static const ColourLayout layout{
      slot::kSize, slot::kJitterCount, slot::kJitterOps, slot::kMaxJitter,
      {{"brightness", kBrightness}, {"contrast", kContrast}, {"saturation", kSaturation}, {"hue", kHue}},
      {{"gray", slot::kGray}, {"sigma", slot::kSigma}, {"solarize", slot::kSolarize}}};
  return layout;
}

CLONES void colour_image(uint8_t* img, int h, int w, const double* params) {
  const size_t n = static_cast<size_t>(h) * w;
  Planes p{img, img + n, img + 2 * n, n};
  const int ops = static_cast<int>(params[slot::kJitterCount]);
  for (int j = 0; j < ops && j < slot::kMaxJitter; ++j) {
    const int op = static_cast<int>(params[slot::kJitterOps + 2 * j]);
    const float f = static_cast<float>(params[slot::kJitterOps + 2 * j + 1]);
    if (op == kBrightness) brightness(p, f);
    else if (op == kContrast) contrast(p, f);
    else if (op == kSaturation) saturation(p, f);
    else if (op == kHue) hue(p, f);
  }
  if (params[slot::kGray] != 0) grayscale(p);
  const double sigma = params[slot::kSigma];
  if (sigma > 0) {
    // rela.loading.views.blur_radius's rule: radius ceil(3 sigma), at most (min(h, w) - 1) / 2
    const int k = 2 * std::min(static_cast<int>(std::ceil(3 * sigma)), (std::min(h, w) - 1) / 2) + 1;
    if (k > 1) {
      const std::vector<float> k1 = gaussian_kernel(k, sigma);
      std::vector<float> tmp, row;
      for (uint8_t* c : {p.r, p.g, p.b}) blur(c, h, w, k1, tmp, row);
    }
  }
  if (params[slot::kSolarize] != 0) solarize(p);
}

}  // namespace rela
