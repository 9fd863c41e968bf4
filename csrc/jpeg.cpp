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
  for (int xx = 0; xx < outsize; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    int xmin = static_cast<int>(center - support + 0.5);
    int xmax = static_cast<int>(center + support + 0.5);
    xmin = std::max(xmin, 0);
    xmax = std::min(xmax, insize);
    double total = 0.0;
    std::vector<double> k(static_cast<size_t>(std::max(xmax - xmin, 0)));
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

inline float round_clamp(float v) {  // nearbyint, then clamped to [0, 255]
  v = std::nearbyint(v);
  return v < 0.f ? 0.f : (v > 255.f ? 255.f : v);
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

constexpr int kBlock = 8;  // output rows (pass 1) or columns (pass 2) computed before one transposed store

// The transposed stores, the passes' costliest part when done one float at a time: an AVX2 8x8
// register transpose where the CPU has it (`has_avx2`, asked once), one value at a time elsewhere
// and for the edges. Data movement only: the same values land in the same places either way.

// Rows b < nb of `rows` (each n3 floats) into t[j * out_size + y0 + b].
void store_rows_transposed_scalar(const float* rows, int n3, int nb, float* t, int out_size, int y0, int j0) {
  for (int j = j0; j < n3; ++j) {
    float* dst = t + static_cast<size_t>(j) * out_size + y0;
    for (int b = 0; b < nb; ++b) dst[b] = rows[static_cast<size_t>(b) * n3 + j];
  }
}

// Columns b < nb of `cols` (each out_size values, rounded) into row yy of plane c at x0 + b
// (mirrored if `flip`), as uint8 or as x * sc + bi (a multiply, then an add: two roundings).
void store_cols_scalar(const float* cols, int out_size, int nb, int x0, bool flip, uint8_t* u8, float* f32,
                       float sc, float bi, int yy0) {
  for (int yy = yy0; yy < out_size; ++yy) {
    const size_t at = static_cast<size_t>(yy) * out_size;
    for (int b = 0; b < nb; ++b) {
      const int ox = flip ? out_size - 1 - (x0 + b) : x0 + b;
      const float x = cols[static_cast<size_t>(b) * out_size + yy];
      if (f32) {
        const float scaled = x * sc;
        f32[at + ox] = scaled + bi;
      } else {
        u8[at + ox] = static_cast<uint8_t>(x);
      }
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

__attribute__((target("avx2"))) void store_rows_transposed_avx2(const float* rows, int n3, int nb, float* t,
                                                                int out_size, int y0) {
  int j = 0;
  if (nb == 8) {
    for (; j + 8 <= n3; j += 8) {
      __m256 r[8];
      for (int b = 0; b < 8; ++b) r[b] = _mm256_loadu_ps(rows + static_cast<size_t>(b) * n3 + j);
      transpose8(r);
      for (int k = 0; k < 8; ++k) _mm256_storeu_ps(t + static_cast<size_t>(j + k) * out_size + y0, r[k]);
    }
  }
  store_rows_transposed_scalar(rows, n3, nb, t, out_size, y0, j);
}

__attribute__((target("avx2"))) void store_cols_avx2(const float* cols, int out_size, int nb, int x0, bool flip,
                                                     uint8_t* u8, float* f32, float sc, float bi) {
  int yy = 0;
  if (nb == 8) {
    const __m256i reverse = _mm256_set_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int ox = flip ? out_size - 8 - x0 : x0;  // the 8 columns' leftmost output position
    const __m256 vs = _mm256_set1_ps(sc), vb = _mm256_set1_ps(bi);
    for (; yy + 8 <= out_size; yy += 8) {
      __m256 r[8];
      for (int b = 0; b < 8; ++b) r[b] = _mm256_loadu_ps(cols + static_cast<size_t>(b) * out_size + yy);
      transpose8(r);  // r[k]: row yy + k, lanes b = 0..7
      for (int k = 0; k < 8; ++k) {
        const __m256 x = flip ? _mm256_permutevar8x32_ps(r[k], reverse) : r[k];
        const size_t at = static_cast<size_t>(yy + k) * out_size + ox;
        if (f32) {
          _mm256_storeu_ps(f32 + at, _mm256_add_ps(_mm256_mul_ps(x, vs), vb));
        } else {
          const __m256i v = _mm256_cvttps_epi32(x);  // whole numbers in [0, 255] already
          const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
          _mm_storel_epi64(reinterpret_cast<__m128i*>(u8 + at), _mm_packus_epi16(w, w));
        }
      }
    }
  }
  store_cols_scalar(cols, out_size, nb, x0, flip, u8, f32, sc, bi, yy);
}

// RELA_SCALAR=1 (read once, at load) keeps to the one-value-at-a-time stores: the test that both
// paths write the same bytes runs it in a subprocess.
const bool has_avx2 = __builtin_cpu_supports("avx2") && !(std::getenv("RELA_SCALAR") && *std::getenv("RELA_SCALAR") == '1');
#else
constexpr bool has_avx2 = false;
#endif

void store_rows_transposed(const float* rows, int n3, int nb, float* t, int out_size, int y0) {
#ifdef RELA_X86
  if (has_avx2) return store_rows_transposed_avx2(rows, n3, nb, t, out_size, y0);
#endif
  store_rows_transposed_scalar(rows, n3, nb, t, out_size, y0, 0);
}

void store_cols(const float* cols, int out_size, int nb, int x0, bool flip, uint8_t* u8, float* f32, float sc,
                float bi) {
#ifdef RELA_X86
  if (has_avx2) return store_cols_avx2(cols, out_size, nb, x0, flip, u8, f32, sc, bi);
#endif
  store_cols_scalar(cols, out_size, nb, x0, flip, u8, f32, sc, bi, 0);
}

// Pass 1, vertical: for each output row, the weighted sum of its source rows over the box's whole
// width (contiguous bytes: vectorises), stored transposed, t[j * out_size + yy], so that pass 2
// runs over contiguous output rows too. Rows are done kBlock at a time, so the transposed store
// writes kBlock neighbouring floats per cache line instead of one. Each sum is in tap order.
CLONES void vertical_pass(const uint8_t* src, size_t stride, int cx0, int cy0, int n3, const Coeffs& v,
                          int out_size, float* rows, float* t) {
  for (int y0 = 0; y0 < out_size; y0 += kBlock) {
    const int nb = std::min(kBlock, out_size - y0);
    for (int b = 0; b < nb; ++b) {
      const int yy = y0 + b;
      const float* k = v.w.data() + static_cast<size_t>(yy) * v.ksize;
      float* row = rows + static_cast<size_t>(b) * n3;
      for (int j = 0; j < n3; ++j) row[j] = 0.f;
      for (int i = 0; i < v.count[yy]; ++i) {
        const uint8_t* s = src + static_cast<size_t>(cy0 + v.start[yy] + i) * stride + static_cast<size_t>(cx0) * 3;
        const float w = k[i];
        for (int j = 0; j < n3; ++j) row[j] += w * static_cast<float>(s[j]);
      }
    }
    store_rows_transposed(rows, n3, nb, t, out_size, y0);
  }
}

// Pass 2, horizontal: output column xx of channel c is the weighted sum of transposed source
// columns, over all output rows at once (vectorises), rounded and clamped; kBlock columns at a
// time are then written to the planar output (mirrored if `flip`) as uint8, or as normalised
// float32 (x * scale[c] + bias[c], the same two float roundings as `normalize_batch`) when `f32`.
CLONES void horizontal_pass(const float* t, const Coeffs& h, int out_size, bool flip, float* cols, uint8_t* u8,
                            float* f32, const float* scale, const float* bias) {
  const size_t plane = static_cast<size_t>(out_size) * out_size;
  for (int c = 0; c < 3; ++c) {
    for (int x0 = 0; x0 < out_size; x0 += kBlock) {
      const int nb = std::min(kBlock, out_size - x0);
      for (int b = 0; b < nb; ++b) {
        const int xx = x0 + b;
        const float* k = h.w.data() + static_cast<size_t>(xx) * h.ksize;
        float* col = cols + static_cast<size_t>(b) * out_size;
        for (int yy = 0; yy < out_size; ++yy) col[yy] = 0.f;
        for (int i = 0; i < h.count[xx]; ++i) {
          const float* src = t + (static_cast<size_t>(h.start[xx] + i) * 3 + c) * out_size;
          const float w = k[i];
          for (int yy = 0; yy < out_size; ++yy) col[yy] += w * src[yy];
        }
        for (int yy = 0; yy < out_size; ++yy) col[yy] = round_clamp(col[yy]);
      }
      const float sc = f32 ? scale[c] : 0.f, bi = f32 ? bias[c] : 0.f;
      store_cols(cols, out_size, nb, x0, flip, u8 ? u8 + c * plane : nullptr, f32 ? f32 + c * plane : nullptr, sc,
                 bi);
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
  // A fresh, zeroed megabyte per view cost a memset and, from the loader's threads, page faults
  // on every call: a per-thread scratch buffer instead. Every element is written before it is read.
  const size_t n_rows = static_cast<size_t>(n3) * kBlock, n_t = static_cast<size_t>(n3) * out_size;
  float* rows = scratch_buffer<float>(n_rows + n_t + static_cast<size_t>(out_size) * kBlock);
  float* t = rows + n_rows;
  float* cols = t + n_t;
  vertical_pass(src, static_cast<size_t>(stride), cx0, cy0, n3, v, out_size, rows, t);
  horizontal_pass(t, h, out_size, flip, cols, out.u8 ? out.u8[view] : nullptr, out.f32 ? out.f32[view] : nullptr,
                  out.scale + 3 * view, out.bias + 3 * view);
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
