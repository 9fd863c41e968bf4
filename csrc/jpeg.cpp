#include "jpeg.h"

#include <jpeglib.h>
#include <setjmp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

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

inline uint8_t clamp_u8(float v) {
  v = std::nearbyint(v);
  return static_cast<uint8_t>(v < 0.f ? 0.f : (v > 255.f ? 255.f : v));
}

// Resample the box [x0, x1) × [y0, y1) (fractional, in `src` pixels) of an RGB image to
// out_size × out_size, clamping the filter at the box's enclosing whole pixels (as cropping
// first and resizing the crop does), mirrored if `flip`.
void resample(const uint8_t* src, int src_w, int stride, double x0, double y0, double x1, double y1,
              int out_size, bool flip, uint8_t* out) {
  const int cx0 = static_cast<int>(std::floor(x0 + 1e-9)), cy0 = static_cast<int>(std::floor(y0 + 1e-9));
  const int cx1 = std::min(src_w, static_cast<int>(std::ceil(x1 - 1e-9)));
  const int cy1 = static_cast<int>(std::ceil(y1 - 1e-9));
  const int in_w = std::max(1, cx1 - cx0), in_h = std::max(1, cy1 - cy0);
  const Coeffs h = make_coeffs(x0 - cx0, x1 - cx0, in_w, out_size);
  const Coeffs v = make_coeffs(y0 - cy0, y1 - cy0, in_h, out_size);
  std::vector<float> tmp(static_cast<size_t>(in_h) * out_size * 3);
  for (int y = 0; y < in_h; ++y) {
    const uint8_t* row = src + static_cast<size_t>(cy0 + y) * stride + static_cast<size_t>(cx0) * 3;
    float* t = tmp.data() + static_cast<size_t>(y) * out_size * 3;
    for (int xx = 0; xx < out_size; ++xx) {
      const float* k = h.w.data() + static_cast<size_t>(xx) * h.ksize;
      float r = 0, g = 0, b = 0;
      const uint8_t* p = row + static_cast<size_t>(h.start[xx]) * 3;
      for (int i = 0; i < h.count[xx]; ++i, p += 3) {
        r += k[i] * p[0];
        g += k[i] * p[1];
        b += k[i] * p[2];
      }
      t[xx * 3] = r;
      t[xx * 3 + 1] = g;
      t[xx * 3 + 2] = b;
    }
  }
  const size_t plane = static_cast<size_t>(out_size) * out_size;  // output is planar: C×S×S
  for (int yy = 0; yy < out_size; ++yy) {
    const float* k = v.w.data() + static_cast<size_t>(yy) * v.ksize;
    uint8_t* o = out + static_cast<size_t>(yy) * out_size;
    for (int xx = 0; xx < out_size; ++xx) {
      float r = 0, g = 0, b = 0;
      for (int i = 0; i < v.count[yy]; ++i) {
        const float* t = tmp.data() + (static_cast<size_t>(v.start[yy] + i) * out_size + xx) * 3;
        r += k[i] * t[0];
        g += k[i] * t[1];
        b += k[i] * t[2];
      }
      const int ox = flip ? out_size - 1 - xx : xx;
      o[ox] = clamp_u8(r);
      o[plane + ox] = clamp_u8(g);
      o[2 * plane + ox] = clamp_u8(b);
    }
  }
}

}  // namespace

std::string decode_resized_crops(const uint8_t* data, size_t size, const int32_t* boxes, const uint8_t* flips,
                                 int views, int out_size, uint8_t* const* outs) {
  jpeg_decompress_struct cinfo;
  ErrorManager err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = on_error;
  err.mgr.emit_message = on_warning;
  std::vector<uint8_t> buf;
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
  // The union of the views' boxes is decoded once; every view is resampled from it.
  int top = 1 << 30, left = 1 << 30, bottom = 0, right = 0, min_side = 1 << 30;
  for (int k = 0; k < views; ++k) {
    const int32_t* b = boxes + 4 * k;  // top, left, height, width in full-resolution pixels
    top = std::min(top, b[0]);
    left = std::min(left, b[1]);
    bottom = std::max(bottom, b[0] + b[2]);
    right = std::max(right, b[1] + b[3]);
    min_side = std::min(min_side, std::min(b[2], b[3]));
  }
  // DCT-domain downscale (1/2, 1/4, 1/8) while every view keeps twice its output resolution, so
  // the antialiased resample still does the final low-pass (output stays close to a full decode).
  int denom = 1;
  while (denom < 8 && min_side / (denom * 2) >= 2 * out_size) denom *= 2;
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
  buf.resize(stride * rows);
  for (int r = 0; r < rows; ++r) {
    JSAMPROW row = buf.data() + static_cast<size_t>(r) * stride;
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
    resample(buf.data(), static_cast<int>(cw), static_cast<int>(stride), x0, y0, x1, std::min(y1, double(rows)),
             out_size, flips[k] != 0, outs[k]);
  }
  return "";
}

}  // namespace rela
