#pragma once
#include <cstdint>

namespace rela {

// Colour operations of one view on a planar uint8 3×h×w image, in place, with torchvision's
// transforms.v2 semantics on uint8 tensors (float32 arithmetic, truncation where torchvision
// converts back with .to(uint8), rounding after the blur):
//   params[0]            number of ColorJitter ops n (0..4), then n pairs (op, factor) in the
//                        drawn order: 1 brightness, 2 contrast, 3 saturation, 4 hue (factor = turn fraction)
//   params[9]            grayscale (0/1), params[10] blur sigma (0 = none), params[11] solarize (0/1)
// The random choices are made by rela.loading.views.colour_params, so results stay a function of
// (seed, epoch, index) whatever runs them.
constexpr int kColourParams = 12;
void colour_image(uint8_t* img, int h, int w, const double* params);

}  // namespace rela
