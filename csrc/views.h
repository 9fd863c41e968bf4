#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace rela {

// Where each of one view's colour parameters (rela.loading.views.ColourParams) sits in the
// params row colour_image reads: defined in views.cpp only, exported by rela._C.colour_layout()
// and filled by name in rela._ext.pack_colour. `jitter_count` holds the number n of ColorJitter
// ops (at most max_jitter), then n pairs (op code, factor) start at `jitter_ops` in the drawn
// order (hue's factor is a fraction of a turn); every other op has one slot.
struct ColourLayout {
  int size, jitter_count, jitter_ops, max_jitter;
  std::vector<std::pair<std::string, int>> jitter;  // op name -> code
  std::vector<std::pair<std::string, int>> slots;   // op name -> slot
};
const ColourLayout& colour_layout();

// Colour operations of one view on a planar uint8 3×h×w image, in place, with torchvision's
// transforms.v2 semantics on uint8 tensors (float32 arithmetic, truncation where torchvision
// converts back with .to(uint8), rounding after the blur). The random choices are made by
// rela.loading.views.colour_params, so results stay a function of (seed, epoch, index).
void colour_image(uint8_t* img, int h, int w, const double* params);

}  // namespace rela
