#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace rela {

// Decode the union of `views` crop boxes of a JPEG once (DCT-domain downscaled when every view
// keeps twice its output resolution; only the rows and iMCU columns the boxes touch), then resample
// each box (top, left, height, width in full-resolution pixels) to out_size × out_size RGB with
// antialiased bilinear, mirrored where flips[k]. outs[k] receives 3*out_size*out_size bytes (planar C×H×W).
// Returns "" on success, else libjpeg's message ("unsupported: CMYK" for CMYK/YCCK files).
std::string decode_resized_crops(const uint8_t* data, size_t size, const int32_t* boxes, const uint8_t* flips,
                                 int views, int out_size, uint8_t* const* outs);

}  // namespace rela
