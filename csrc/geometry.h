// Crop boxes and flips drawn in C++ on the very streams rela.loading.views draws them on in
// Python (a torch.Generator per sample and view, seeded through numpy's SeedSequence), so that
// the fast path and the general path give every sample the same view.
#pragma once
#include <cstdint>

namespace rela {

struct CropRule {
  bool random = true;           // RandomResizedCrop; false: the centred square (eval view)
  double scale[2] = {0.08, 1};  // area fraction range
  double ratio[2] = {0.75, 4.0 / 3.0};
  double flip = 0;              // probability of a horizontal flip
};

// numpy.random.SeedSequence(entropy).generate_state(1, np.uint32)[0] for the entropy words
// `words` (each Python int already split into its little-endian 32-bit words, as numpy does).
uint32_t seed_sequence_word(const uint32_t* words, int n);

// One sample's view: box (top, left, height, width) and flip, drawn from a torch CPU generator
// seeded with `seed` (torch keeps its low 32 bits: MT19937), exactly as views.geometry draws it.
void draw_geometry(uint32_t seed, int height, int width, const CropRule& rule, int32_t* box, uint8_t* flip);

}  // namespace rela
