#include "jpeg.h"

#include <jpeglib.h>
#include <setjmp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define RELA_X86 1
#endif

namespace rela {
namespace {

struct ErrorManager {
  jpeg_error_mgr mgr;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void on_error(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<ErrorManager*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

void on_warning(j_common_ptr cinfo, int level) {
  // Corrupt-data warnings (level -1) are errors for us: a truncated file must not train as grey.
  if (level < 0) on_error(cinfo);
}

void ignore_warning(j_common_ptr, int) {}  // the header read: junk bytes libjpeg skips are not its business

// A per-thread, per-type buffer of at least n elements, uninitialised, reused by the thread's next
// call (the loader's threads decode image after image: no allocation, no fresh pages per call).
// Up to kKeep bytes are kept between calls; a larger request gets a buffer of its own that the
// thread's next call frees, so one huge image does not hold its memory for the thread's lifetime.
template <typename T>
T* scratch_buffer(size_t n) {
  constexpr size_t kKeep = size_t{64} << 20;
  thread_local std::unique_ptr<T[]> kept, big;
  thread_local size_t capacity = 0;
  big.reset();
  if (n * sizeof(T) > kKeep) {
    big.reset(new T[n]);
    return big.get();
  }
  if (capacity < n) {
    kept.reset(new T[n]);
    capacity = n;
  }
  return kept.get();
}

// Antialiased bilinear (triangle filter widened by the downscale factor), as PIL and
// torchvision's antialias=True compute it: for each output pixel, the first source index and
// the normalised weights over the source span [in0, in1) of a source of `insize` pixels.
struct Coeffs {
  int ksize = 0;
  std::vector<int> start, count;
  std::vector<float> w;  // out * ksize
};

Coeffs make_coeffs(double in0, double in1, int insize, int outsize) {
  Coeffs c;
  const double scale = (in1 - in0) / outsize;
  const double filterscale = std::max(scale, 1.0);
  const double support = 1.0 * filterscale;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.start.resize(outsize);
  c.count.resize(outsize);
  c.w.assign(static_cast<size_t>(outsize) * c.ksize, 0.0f);
  std::vector<double> k(static_cast<size_t>(c.ksize));  // one output pixel's taps, reused
  for (int xx = 0; xx < outsize; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    int xmin = static_cast<int>(center - support + 0.5);
    int xmax = static_cast<int>(center + support + 0.5);
    xmin = std::max(xmin, 0);
    xmax = std::min(xmax, insize);
    double total = 0.0;
    for (int x = 0; x < xmax - xmin; ++x) {
      const double t = std::fabs((x + xmin - center + 0.5) / filterscale);
      k[x] = t < 1.0 ? 1.0 - t : 0.0;
      total += k[x];
    }
    c.start[xx] = xmin;
    c.count[xx] = xmax - xmin;
    for (int x = 0; x < xmax - xmin; ++x)
      c.w[static_cast<size_t>(xx) * c.ksize + x] = static_cast<float>(total > 0 ? k[x] / total : 0.0);
  }
  return c;
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

constexpr int kBlock = 8;  // a strip's output rows, and the output columns stored at a time

// The resampler works on strips of kBlock output rows, so that its intermediate values stay in
// the core's own cache: pass 1 (vertical) sums a strip's source rows over the box's whole width,
// those rows are transposed, pass 2 (horizontal) sums source columns for kBlock rows at once (one
// vector per tap) and kBlock x kBlock blocks are transposed back into the planar output. Each
// output value is the same float expression, summed in the same tap order, whatever the tiling:
// the pixels do not depend on it (nor on the vector or scalar paths below). Checked when this
// replaced whole-box passes: the same bytes over 1,320 crops of real photos (sizes 7-300, one to
// four views, flipped or not, uint8 and float32, full and scaled decode), and
// tests/loading/test_jpeg_decoder.py holds them to a float32 reference of the expression.

// The transposed stores: an AVX2 8x8 register transpose where the CPU has it (`has_avx2`, asked
// once), one value at a time elsewhere. Data movement only: the same values land in the same places.

// Rows b < kBlock of `rows` (each n3 floats) into t[j * kBlock + b], columns from j0 on.
void transpose_rows_scalar(const float* rows, int n3, float* t, int j0) {
  for (int j = j0; j < n3; ++j)
    for (int b = 0; b < kBlock; ++b) t[static_cast<size_t>(j) * kBlock + b] = rows[static_cast<size_t>(b) * n3 + j];
}

// Where one output block goes: plane rows y0 + r (r < nr) and columns x0 + b (b < nb, mirrored
// if `flip`), as uint8 or as x * sc + bi (a multiply, then an add: two roundings).
struct Block {
  int out_size, y0, nr, x0, nb;
  bool flip;
  bool stream;  // float32 rows of whole, aligned cache lines: 16 columns at a time, non-temporal
  uint8_t* u8;
  float* f32;
  float sc, bi;
};

// cols[b * kBlock + r] is the value at row y0 + r, column x0 + b.
void store_block_scalar(const float* cols, const Block& k) {
  for (int r = 0; r < k.nr; ++r) {
    const size_t at = static_cast<size_t>(k.y0 + r) * k.out_size;
    for (int b = 0; b < k.nb; ++b) {
      const int ox = k.flip ? k.out_size - 1 - (k.x0 + b) : k.x0 + b;
      const float x = cols[b * kBlock + r];
      if (k.f32) {
        const float scaled = x * k.sc;
        k.f32[at + ox] = scaled + k.bi;
      } else {
        k.u8[at + ox] = static_cast<uint8_t>(x);
      }
    }
  }
}

// Pass 1, vertical, for output rows y0 .. y0 + nr: the weighted sum of each row's source rows over
// the box's whole width (contiguous bytes: vectorises), in tap order from zero, into
// rows[r * n3 + j]. This is the path without AVX2 (vertical_transposed picks).
CLONES void vertical_strip_rows(const uint8_t* src, size_t stride, int cx0, int cy0, int n3, const Coeffs& v, int y0,
                                int nr, float* rows) {
  for (int r = 0; r < nr; ++r) {
    const int yy = y0 + r;
    const float* k = v.w.data() + static_cast<size_t>(yy) * v.ksize;
    float* row = rows + static_cast<size_t>(r) * n3;
    for (int j = 0; j < n3; ++j) row[j] = 0.f;
    for (int i = 0; i < v.count[yy]; ++i) {
      const uint8_t* s = src + static_cast<size_t>(cy0 + v.start[yy] + i) * stride + static_cast<size_t>(cx0) * 3;
      const float w = k[i];
      for (int j = 0; j < n3; ++j) row[j] += w * static_cast<float>(s[j]);
    }
  }
}

#ifdef RELA_X86
__attribute__((target("avx2"))) inline void transpose8(__m256* r) {
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

__attribute__((target("avx2"))) void store_block_avx2(const float* cols, const Block& k) {
  if (k.nb != 8 || k.nr != 8) return store_block_scalar(cols, k);
  __m256 r[8];
  for (int b = 0; b < 8; ++b) r[b] = _mm256_loadu_ps(cols + b * kBlock);
  transpose8(r);  // r[i]: row y0 + i, lanes b = 0..7
  const __m256i reverse = _mm256_set_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int ox = k.flip ? k.out_size - 8 - k.x0 : k.x0;  // the 8 columns' leftmost output position
  const __m256 vs = _mm256_set1_ps(k.sc), vb = _mm256_set1_ps(k.bi);
  for (int i = 0; i < 8; ++i) {
    const __m256 x = k.flip ? _mm256_permutevar8x32_ps(r[i], reverse) : r[i];
    const size_t at = static_cast<size_t>(k.y0 + i) * k.out_size + ox;
    if (k.f32) {
      _mm256_storeu_ps(k.f32 + at, _mm256_add_ps(_mm256_mul_ps(x, vs), vb));
    } else {
      const __m256i v = _mm256_cvttps_epi32(x);  // whole numbers in [0, 255] already
      const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(k.u8 + at), _mm_packus_epi16(w, w));
    }
  }
}

__attribute__((target("avx2"))) inline __m256 bytes_to_floats(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Pass 1 with AVX2 (see vertical_strip_rows): eight columns at a time go through every tap in a
// register, so a row is written once instead of read and written back per tap. The same
// multiply, then add, per tap in tap order from zero: the same floats.
__attribute__((target("avx2"))) void vertical_strip_avx2(const uint8_t* src, size_t stride, int cx0, int cy0, int n3,
                                                         const Coeffs& v, int y0, int nr, float* rows) {
  for (int r = 0; r < nr; ++r) {
    const int yy = y0 + r, taps = v.count[yy];
    const float* k = v.w.data() + static_cast<size_t>(yy) * v.ksize;
    const uint8_t* s = src + static_cast<size_t>(cy0 + v.start[yy]) * stride + static_cast<size_t>(cx0) * 3;
    float* row = rows + static_cast<size_t>(r) * n3;
    int j = 0;
    for (; j + 8 <= n3; j += 8) {
      __m256 acc = _mm256_setzero_ps();
      for (int i = 0; i < taps; ++i)
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(k[i]), bytes_to_floats(s + i * stride + j)));
      _mm256_storeu_ps(row + j, acc);
    }
    for (; j < n3; ++j) {
      float acc = 0.f;
      for (int i = 0; i < taps; ++i) acc += k[i] * static_cast<float>(s[i * stride + j]);
      row[j] = acc;
    }
  }
}

// The strip's kBlock rows (each n3 floats) into t[j * kBlock + b]: 8x8 register transposes.
__attribute__((target("avx2"))) void transpose_rows_avx2(const float* rows, int n3, float* t) {
  int j = 0;
  for (; j + 8 <= n3; j += 8) {
    __m256 r[8];
    for (int b = 0; b < 8; ++b) r[b] = _mm256_loadu_ps(rows + static_cast<size_t>(b) * n3 + j);
    transpose8(r);
    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(t + static_cast<size_t>(j + k) * kBlock, r[k]);
  }
  transpose_rows_scalar(rows, n3, t, j);
}

// Sixteen columns (cols[b * kBlock + r], b < 16) of eight rows as float32, each row's 64 bytes
// one whole cache line written with non-temporal stores: the batch is not read back by this
// core, so its lines need not be fetched first (half the memory traffic of ordinary stores).
__attribute__((target("avx2"))) void store_lines_avx2(const float* cols, const Block& k) {
  __m256 a[8], b[8];
  for (int i = 0; i < 8; ++i) {
    a[i] = _mm256_loadu_ps(cols + i * kBlock);
    b[i] = _mm256_loadu_ps(cols + (8 + i) * kBlock);
  }
  transpose8(a);  // a[i]: row y0 + i, columns x0 .. x0 + 7; b[i]: x0 + 8 .. x0 + 15
  transpose8(b);
  const __m256i reverse = _mm256_set_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int ox = k.flip ? k.out_size - 16 - k.x0 : k.x0;
  const __m256 vs = _mm256_set1_ps(k.sc), vb = _mm256_set1_ps(k.bi);
  for (int i = 0; i < 8; ++i) {
    const __m256 lo = k.flip ? _mm256_permutevar8x32_ps(b[i], reverse) : a[i];
    const __m256 hi = k.flip ? _mm256_permutevar8x32_ps(a[i], reverse) : b[i];
    float* at = k.f32 + static_cast<size_t>(k.y0 + i) * k.out_size + ox;
    _mm256_stream_ps(at, _mm256_add_ps(_mm256_mul_ps(lo, vs), vb));
    _mm256_stream_ps(at + 8, _mm256_add_ps(_mm256_mul_ps(hi, vs), vb));
  }
}

// RELA_SCALAR=1 (read once, at load) keeps to the one-value-at-a-time stores: the test that both
// paths write the same bytes runs it in a subprocess.
const bool has_avx2 = __builtin_cpu_supports("avx2") && !(std::getenv("RELA_SCALAR") && *std::getenv("RELA_SCALAR") == '1');
#else
constexpr bool has_avx2 = false;
#endif

void store_block(const float* cols, const Block& k) {
#ifdef RELA_X86
  if (k.stream) return store_lines_avx2(cols, k);
  if (has_avx2) return store_block_avx2(cols, k);
#endif
  store_block_scalar(cols, k);
}

// Pass 1 for one strip, transposed into t[j * kBlock + r] via `rows` (a strip's rows before
// their transpose); rows past `nr` are zeros, so the transposes always move whole 8x8 blocks.
void vertical_transposed(const uint8_t* src, size_t stride, int cx0, int cy0, int n3, const Coeffs& v, int y0, int nr,
                         float* rows, float* t) {
  if (nr < kBlock) std::fill(rows + static_cast<size_t>(nr) * n3, rows + static_cast<size_t>(kBlock) * n3, 0.f);
#ifdef RELA_X86
  if (has_avx2) {
    vertical_strip_avx2(src, stride, cx0, cy0, n3, v, y0, nr, rows);
    return transpose_rows_avx2(rows, n3, t);
  }
#endif
  vertical_strip_rows(src, stride, cx0, cy0, n3, v, y0, nr, rows);
  transpose_rows_scalar(rows, n3, t, 0);
}

// Whole cache lines for this plane (`Block::stream`): AVX2, float32, rows of a multiple of 16
// floats from a 64-byte aligned start.
bool streams(const float* f32, int out_size) {
#ifdef RELA_X86
  return has_avx2 && f32 && out_size % 16 == 0 && reinterpret_cast<uintptr_t>(f32) % 64 == 0;
#else
  return false;
#endif
}

// Non-temporal stores are weakly ordered: fence them before the batch is handed on.
void fence_stores() {
#ifdef RELA_X86
  if (has_avx2) _mm_sfence();
#endif
}

// Eight floats as one value (GCC's vector extension: one AVX register in the avx2 clone, two SSE
// registers in the baseline one). Multiplies and adds stay separate operations (neither clone
// targets FMA), so each lane rounds as the scalar expression does.
typedef float Lanes __attribute__((vector_size(kBlock * sizeof(float))));
// Passed by value between inline helpers of this file only: GCC's note that such values change the
// ABI without AVX concerns calls across translation units, which there are none of.
#pragma GCC diagnostic ignored "-Wpsabi"

inline Lanes load_lanes(const float* p) {
  Lanes v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// Round (half to even, as nearbyint in the default rounding mode: adding and subtracting
// 1.5 * 2^23 does it for |v| < 2^22; the sums here are in [0, 255]), then clamp to [0, 255].
inline Lanes round_clamp_lanes(Lanes v) {
  const float magic = 12582912.0f;
  v = (v + magic) - magic;
  const Lanes zero = {}, top = zero + 255.f;
  v = v < zero ? zero : v;
  return v > top ? top : v;
}

// Pass 2, horizontal, for one strip: output column xx of channel c is the weighted sum of the
// strip's transposed source columns t[j * kBlock + r], for its kBlock rows at once (one vector
// per tap and channel: a tap's three channels are 24 neighbouring floats), in tap order, rounded
// and clamped, into cols[c][b * kBlock + r] for xx = x0 + b < x0 + nb.
CLONES void horizontal_block(const float* t, const Coeffs& h, int x0, int nb, float* const* cols) {
  for (int b = 0; b < nb; ++b) {
    const int xx = x0 + b;
    const float* w = h.w.data() + static_cast<size_t>(xx) * h.ksize;
    const float* src = t + static_cast<size_t>(h.start[xx]) * 3 * kBlock;
    Lanes r = {}, g = {}, bl = {};
    for (int i = 0; i < h.count[xx]; ++i, src += 3 * kBlock) {
      r += w[i] * load_lanes(src);
      g += w[i] * load_lanes(src + kBlock);
      bl += w[i] * load_lanes(src + 2 * kBlock);
    }
    r = round_clamp_lanes(r), g = round_clamp_lanes(g), bl = round_clamp_lanes(bl);
    __builtin_memcpy(cols[0] + b * kBlock, &r, sizeof r);
    __builtin_memcpy(cols[1] + b * kBlock, &g, sizeof g);
    __builtin_memcpy(cols[2] + b * kBlock, &bl, sizeof bl);
  }
}

// One strip, a block of columns (16 when streaming whole lines, else 8) at a time, each block's
// three channels stored into their planes (`planes[c]`).
void horizontal_strip(const float* t, const Coeffs& h, const Block* planes, float* scratch) {
  Block k = planes[0];
  const int step = k.stream ? 2 * kBlock : kBlock;
  float* const cols[3] = {scratch, scratch + 2 * kBlock * kBlock, scratch + 4 * kBlock * kBlock};
  for (int x0 = 0; x0 < k.out_size; x0 += step) {
    const int nb = std::min(step, k.out_size - x0);
    for (int x = 0; x < nb; x += kBlock) {
      float* const at[3] = {cols[0] + x * kBlock, cols[1] + x * kBlock, cols[2] + x * kBlock};
      horizontal_block(t, h, x0 + x, std::min(kBlock, nb - x), at);
    }
    for (int c = 0; c < 3; ++c) {
      k = planes[c];
      k.x0 = x0, k.nb = nb;
      store_block(cols[c], k);
    }
  }
}

// Resample the box [x0, x1) × [y0, y1) (fractional, in `src` pixels) of an RGB image to
// out_size × out_size, clamping the filter at the box's enclosing whole pixels (as cropping
// first and resizing the crop does), mirrored if `flip`. Separable: vertical, then horizontal.
// Returns false, touching nothing, when the box's whole pixels are not inside the src_w × src_h
// buffer: every row and column the filter reads lies in [cx0, cx1) × [cy0, cy1).
bool resample(const uint8_t* src, int src_w, int src_h, int stride, double x0, double y0, double x1, double y1,
              int out_size, bool flip, const Output& out, int view) {
  if (!(std::isfinite(x0) && std::isfinite(y0) && std::isfinite(x1) && std::isfinite(y1))) return false;
  const int cx0 = static_cast<int>(std::floor(x0 + 1e-9)), cy0 = static_cast<int>(std::floor(y0 + 1e-9));
  const int cx1 = std::min(src_w, static_cast<int>(std::ceil(x1 - 1e-9)));
  const int cy1 = std::min(src_h, static_cast<int>(std::ceil(y1 - 1e-9)));
  if (cx0 < 0 || cy0 < 0 || cx1 <= cx0 || cy1 <= cy0) return false;
  const int in_w = cx1 - cx0, in_h = cy1 - cy0;
  const Coeffs h = make_coeffs(x0 - cx0, x1 - cx0, in_w, out_size);
  const Coeffs v = make_coeffs(y0 - cy0, y1 - cy0, in_h, out_size);
  const int n3 = in_w * 3;
  // Per-thread scratch (no allocation per view): a strip's rows, transposed, and one output block
  // of each channel.
  const size_t n_rows = static_cast<size_t>(n3) * kBlock;
  float* rows = scratch_buffer<float>(2 * n_rows + 6 * kBlock * kBlock);
  float* t = rows + n_rows;
  float* cols = t + n_rows;
  // The three output planes, each stored whole-line (`stream`) or not, all alike.
  const size_t plane = static_cast<size_t>(out_size) * out_size;
  Block planes[3];
  for (int c = 0; c < 3; ++c) {
    Block& k = planes[c];
    k = Block{out_size, 0, 0, 0, 0, flip, false, nullptr, nullptr, 0.f, 0.f};
    if (out.f32) {
      k.f32 = out.f32[view] + c * plane;
      k.stream = streams(out.f32[view], out_size);
      k.sc = out.scale[3 * view + c];
      k.bi = out.bias[3 * view + c];
    } else {
      k.u8 = out.u8[view] + c * plane;
    }
  }
  for (int y0 = 0; y0 < out_size; y0 += kBlock) {
    const int nr = std::min(kBlock, out_size - y0);
    vertical_transposed(src, static_cast<size_t>(stride), cx0, cy0, n3, v, y0, nr, rows, t);
    for (Block& k : planes) k.y0 = y0, k.nr = nr;
    horizontal_strip(t, h, planes, cols);
  }
  fence_stores();
  return true;
}

// The box (top, left, height, width) lies inside a width × height image, without int overflow.
bool box_inside(const int32_t* b, int64_t width, int64_t height) {
  return b[0] >= 0 && b[1] >= 0 && b[2] > 0 && b[3] > 0 && int64_t{b[0]} + b[2] <= height &&
         int64_t{b[1]} + b[3] <= width;
}

}  // namespace

std::string read_header(const uint8_t* data, size_t size, Header* header) {
  jpeg_decompress_struct cinfo;
  ErrorManager err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = on_error;
  err.mgr.emit_message = ignore_warning;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return std::string(err.message);
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(&cinfo, TRUE);  // errors on a zero width, height or component count (JERR_EMPTY_IMAGE)
  header->width = static_cast<int64_t>(cinfo.image_width);
  header->height = static_cast<int64_t>(cinfo.image_height);
  header->components = cinfo.num_components;
  header->cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
  jpeg_destroy_decompress(&cinfo);
  return "";
}

int scale_denominator(const int32_t* boxes, const int* out_sizes, int views, double fit) {
  int denom = 1;
  if (!(fit > 0)) return denom;
  for (int next = 2; next <= 4; next *= 2) {
    for (int k = 0; k < views; ++k) {
      const int32_t* b = boxes + 4 * k;
      if (static_cast<double>(std::min(b[2], b[3])) / next < fit * out_sizes[k]) return denom;
    }
    denom = next;
  }
  return denom;
}

std::string decode_resized_crops(const uint8_t* data, size_t size, const int32_t* boxes, const uint8_t* flips,
                                 int views, const int* out_sizes, double fit, const Output& outs) {
  jpeg_decompress_struct cinfo;
  ErrorManager err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = on_error;
  err.mgr.emit_message = on_warning;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return std::string(err.message);
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
    jpeg_destroy_decompress(&cinfo);
    return "unsupported: CMYK";
  }
  cinfo.out_color_space = JCS_RGB;
  // The boxes were drawn for the size the caller read (read_header); a file whose frame says
  // otherwise, or a box outside it, is refused before anything is decoded.
  for (int k = 0; k < views; ++k) {
    if (!box_inside(boxes + 4 * k, cinfo.image_width, cinfo.image_height)) {
      jpeg_destroy_decompress(&cinfo);
      return "crop box outside the " + std::to_string(cinfo.image_width) + "x" + std::to_string(cinfo.image_height) +
             " frame the decoder read (a header that disagrees with the image data)";
    }
  }
  // The union of the views' boxes is decoded once; every view is resampled from it.
  int top = 1 << 30, left = 1 << 30, bottom = 0, right = 0;
  for (int k = 0; k < views; ++k) {
    const int32_t* b = boxes + 4 * k;  // top, left, height, width in full-resolution pixels
    top = std::min(top, b[0]);
    left = std::min(left, b[1]);
    bottom = std::max(bottom, b[0] + b[2]);
    right = std::max(right, b[1] + b[3]);
  }
  // DCT-domain downscale while every view's box still covers its output: the scaled IDCT is the
  // low-pass, the antialiased resample the rest (docs: pixels against the full decode).
  const int denom = scale_denominator(boxes, out_sizes, views, fit);
  cinfo.scale_num = 1;
  cinfo.scale_denom = denom;
  jpeg_start_decompress(&cinfo);
  const int W = static_cast<int>(cinfo.output_width), H = static_cast<int>(cinfo.output_height);
  const double s = static_cast<double>(W) / cinfo.image_width;  // exact scale (may round)
  const int sx = std::max(0, static_cast<int>(std::floor(left * s)));
  const int ex = std::min(W, static_cast<int>(std::ceil(right * s)));
  const int sy = std::max(0, static_cast<int>(std::floor(top * s)));
  const int ey = std::min(H, static_cast<int>(std::ceil(bottom * s)));
  JDIMENSION xoff = static_cast<JDIMENSION>(sx), cw = static_cast<JDIMENSION>(std::max(1, ex - sx));
  if (cw < static_cast<JDIMENSION>(W)) jpeg_crop_scanline(&cinfo, &xoff, &cw);
  if (sy > 0) jpeg_skip_scanlines(&cinfo, static_cast<JDIMENSION>(sy));
  const int rows = std::max(1, ey - sy);
  const size_t stride = static_cast<size_t>(cw) * 3;
  // The decoded region, in a per-thread buffer (every byte is written by jpeg_read_scanlines before
  // the resampler reads it: no clearing, no fresh pages per image).
  uint8_t* const buf = scratch_buffer<uint8_t>(stride * rows);
  for (int r = 0; r < rows; ++r) {
    JSAMPROW row = buf + static_cast<size_t>(r) * stride;
    if (jpeg_read_scanlines(&cinfo, &row, 1) != 1) {
      jpeg_destroy_decompress(&cinfo);
      return "premature end of image data";
    }
  }
  jpeg_abort_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  for (int k = 0; k < views; ++k) {
    const int32_t* b = boxes + 4 * k;
    const double x0 = b[1] * s - xoff, y0 = b[0] * s - sy;
    const double x1 = (b[1] + b[3]) * s - xoff, y1 = (b[0] + b[2]) * s - sy;
    if (!resample(buf, static_cast<int>(cw), rows, static_cast<int>(stride), x0, y0, x1, y1, out_sizes[k],
                  flips[k] != 0, outs, k))
      return "crop box outside the decoded region";
  }
  return "";
}

}  // namespace rela
