#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace rela {

// Where a row's views go: uint8 planes (`u8[k]`, 3*out_size*out_size bytes for view k), or
// normalised float32 planes (`f32[k]`, x * scale[3k + c] + bias[3k + c] for channel c).
struct Output {
  uint8_t* const* u8 = nullptr;
  float* const* f32 = nullptr;
  const float* scale = nullptr;
  const float* bias = nullptr;
};

// What a JPEG's frame header says, as libjpeg reads it (the decoder's own parse: the size every
// caller draws boxes in and checks limits against).
struct Header {
  int64_t width = 0, height = 0;
  int components = 0;
  bool cmyk = false;
};

// Fill `header` from jpeg_read_header (corrupt-data warnings ignored, as the decoders skip such
// bytes). Returns "" on success, else libjpeg's message (an empty image: zero width or height).
std::string read_header(const uint8_t* data, size_t size, Header* header);

// Decode the union of `views` crop boxes of a JPEG once (only the rows and iMCU columns the boxes
// touch; DCT-domain downscaled by 1/2 or 1/4 — libjpeg-turbo's SIMD scales — when `fit` > 0 and
// every view's box at that scale still covers `fit` times its output size), then resample each box (top, left,
// height, width in full-resolution pixels) to out_sizes[k] × out_sizes[k] RGB with antialiased
// bilinear, mirrored where flips[k], into `outs` (planar C×H×W).
// Every box must lie inside the frame libjpeg reads, and every resampled box inside the decoded
// region: otherwise nothing is read and an error comes back.
// Returns "" on success, else libjpeg's message ("unsupported: CMYK" for CMYK/YCCK files).
std::string decode_resized_crops(const uint8_t* data, size_t size, const int32_t* boxes, const uint8_t* flips,
                                 int views, const int* out_sizes, double fit, const Output& outs);

// The DCT scale denominator (1, 2 or 4) for these boxes and output sizes: the largest at which
// every box's shorter side, scaled, is at least `fit` times its view's output size.
int scale_denominator(const int32_t* boxes, const int* out_sizes, int views, double fit);

}  // namespace rela
