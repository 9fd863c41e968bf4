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

// Decode the union of `views` crop boxes of a JPEG once (DCT-domain downscaled when every view
// keeps twice its output resolution; only the rows and iMCU columns the boxes touch), then resample
// each box (top, left, height, width in full-resolution pixels) to out_size × out_size RGB with
// antialiased bilinear, mirrored where flips[k], into `outs` (planar C×H×W).
// Every box must lie inside the frame libjpeg reads, and every resampled box inside the decoded
// region: otherwise nothing is read and an error comes back.
// Returns "" on success, else libjpeg's message ("unsupported: CMYK" for CMYK/YCCK files).
std::string decode_resized_crops(const uint8_t* data, size_t size, const int32_t* boxes, const uint8_t* flips,
                                 int views, int out_size, const Output& outs);

}  // namespace rela
