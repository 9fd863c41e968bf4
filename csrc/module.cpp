// rela._C: rela's compiled helpers — index sampling, JPEG crop decoding, view colour operations,
// image-folder listing. Every function releases the GIL while it works.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <thread>
#include <string>
#include <vector>

#ifdef RELA_WITH_JPEG
#include "jpeg.h"
#endif
#include "geometry.h"
#include "sampling.h"
#include "scan.h"
#include "views.h"

namespace py = pybind11;

// fn(i) for every row i < n on min(threads, n) threads (the caller's among them); each thread takes
// the next row when it is done, so a thread the OS preempts (a busy machine) holds up one row, not
// its whole share of the batch.
template <typename Fn>
static void for_rows(int64_t n, int threads, const Fn& fn) {
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    for (int64_t i = next++; i < n; i = next++) fn(i);
  };
  const int t = std::max(1, std::min<int>(threads, static_cast<int>(n)));
  std::vector<std::thread> pool;
  for (int k = 1; k < t; ++k) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
}

static py::array_t<int64_t> permutation(int64_t n, uint64_t seed) {
  if (n < 0) throw std::invalid_argument("permutation: n must be >= 0");
  py::array_t<int64_t> out(n);
  int64_t* data = out.mutable_data();
  {
    py::gil_scoped_release release;
    rela::permutation(n, seed, data);
  }
  return out;
}

static py::array_t<int64_t> uniform_subset(int64_t n, int64_t k, uint64_t seed) {
  if (n < 0 || k < 0 || k > n)
    throw std::invalid_argument("uniform_subset: need 0 <= k <= n, got n=" + std::to_string(n) +
                                ", k=" + std::to_string(k));
  py::array_t<int64_t> out(k);
  int64_t* data = out.mutable_data();
  {
    py::gil_scoped_release release;
    rela::uniform_subset(n, k, seed, data);
  }
  return out;
}

static py::array_t<int64_t> weighted_subset(
    py::array_t<float, py::array::c_style | py::array::forcecast> weights, int64_t k,
    uint64_t seed, int threads) {
  if (weights.ndim() != 1) throw std::invalid_argument("weighted_subset: weights must be 1-d");
  const int64_t n = weights.shape(0);
  if (k < 0 || k > n)
    throw std::invalid_argument("weighted_subset: need 0 <= k <= len(weights)");
  py::array_t<int64_t> out(k);
  int64_t* data = out.mutable_data();
  const float* w = weights.data();
  bool ok;
  {
    py::gil_scoped_release release;
    ok = rela::weighted_subset(w, n, k, seed, threads, data);
  }
  if (!ok)
    throw std::invalid_argument("weighted_subset: fewer than k weights are positive and finite");
  return out;
}

// A Python int >= 0 as numpy's SeedSequence reads it: little-endian 32-bit words, 0 as [0].
static void append_words(uint64_t v, std::vector<uint32_t>& out) {
  if (v == 0) out.push_back(0);
  for (; v > 0; v >>= 32) out.push_back(static_cast<uint32_t>(v & 0xFFFFFFFFu));
}

// One view's boxes and flips for a batch: sample i's stream is seeded by
// SeedSequence([*prefix, indices[i], *suffix]) (views.sample_generator), sized heights[i] x widths[i].
static py::tuple draw_geometry(const std::vector<uint64_t>& prefix,
                               py::array_t<int64_t, py::array::c_style | py::array::forcecast> indices,
                               const std::vector<uint64_t>& suffix,
                               py::array_t<int32_t, py::array::c_style | py::array::forcecast> heights,
                               py::array_t<int32_t, py::array::c_style | py::array::forcecast> widths, bool random,
                               std::pair<double, double> scale, std::pair<double, double> ratio, double flip) {
  const int64_t n = indices.size();
  if (indices.ndim() != 1 || heights.size() != n || widths.size() != n)
    throw std::invalid_argument("draw_geometry: indices, heights and widths must be 1-d, of one length");
  rela::CropRule rule;
  rule.random = random;
  rule.scale[0] = scale.first, rule.scale[1] = scale.second;
  rule.ratio[0] = ratio.first, rule.ratio[1] = ratio.second;
  rule.flip = flip;
  py::array_t<int32_t> boxes({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(4)});
  py::array_t<uint8_t> flips(n);
  const int64_t* idx = indices.data();
  const int32_t *hs = heights.data(), *ws = widths.data();
  int32_t* b = boxes.mutable_data();
  uint8_t* f = flips.mutable_data();
  for (int64_t i = 0; i < n; ++i)
    if (idx[i] < 0 || hs[i] < 1 || ws[i] < 1)
      throw std::invalid_argument("draw_geometry: indices must be >= 0 and sizes >= 1");
  {
    py::gil_scoped_release release;
    std::vector<uint32_t> words;
    for (uint64_t v : prefix) append_words(v, words);
    const size_t common = words.size();  // the prefix's words, the same for every sample
    for (int64_t i = 0; i < n; ++i) {
      words.resize(common);
      append_words(static_cast<uint64_t>(idx[i]), words);
      for (uint64_t v : suffix) append_words(v, words);
      const uint32_t seed = rela::seed_sequence_word(words.data(), static_cast<int>(words.size()));
      rela::draw_geometry(seed, hs[i], ws[i], rule, b + 4 * i, f + i);
    }
  }
  return py::make_tuple(boxes, flips);
}

#ifdef RELA_WITH_JPEG
// Batch of JPEGs -> each view's crops written into `outs[k]`, at batch row rows[i] for JPEG i:
// uint8 [N, 3, S_k, S_k] arrays, or float32 ones normalised as x * scale[k, c] + bias[k, c]. `out_size`
// is one size for every view or one per view (multi-crop). Without `outs`, fresh uint8 arrays (row
// i for JPEG i) are made and returned. `fit` > 0: DCT-domain 1/2 or 1/4 where every view's box
// still covers fit x its output (0: full resolution).
// Returns (outs, errors): errors[i] is "" or libjpeg's message.
static py::tuple decode_resized_crops(const py::list& jpegs,
                                     py::array_t<int32_t, py::array::c_style | py::array::forcecast> boxes,
                                     py::array_t<uint8_t, py::array::c_style | py::array::forcecast> flips,
                                     py::object out_size_arg, int threads, py::object outs_arg, py::object rows_arg,
                                     py::object scale_arg, py::object bias_arg, double fit) {
  const int64_t n = static_cast<int64_t>(jpegs.size());
  if (boxes.ndim() != 3 || boxes.shape(0) != n || boxes.shape(2) != 4)
    throw std::invalid_argument("boxes must be [B, views, 4] (top, left, height, width)");
  const int views = static_cast<int>(boxes.shape(1));
  if (flips.ndim() != 2 || flips.shape(0) != n || flips.shape(1) != views)
    throw std::invalid_argument("flips must be [B, views]");
  std::vector<int> sizes;
  if (py::isinstance<py::int_>(out_size_arg)) {
    sizes.assign(static_cast<size_t>(views), out_size_arg.cast<int>());
  } else {
    sizes = out_size_arg.cast<std::vector<int>>();
    if (static_cast<int>(sizes.size()) != views) throw std::invalid_argument("out_size needs one size per view");
  }
  for (int s : sizes)
    if (s < 1 || s > 16384) throw std::invalid_argument("out_size must be in [1, 16384]");
  // Each file's bytes (bytes, memoryview, any buffer) are read in place, without the GIL; the
  // buffer views hold them until the decode is done.
  std::vector<py::buffer_info> data;
  data.reserve(static_cast<size_t>(n));
  for (const auto& item : jpegs) data.push_back(py::reinterpret_borrow<py::buffer>(item).request());
  const bool normalise = !scale_arg.is_none();
  py::list outs;
  if (outs_arg.is_none()) {
    if (normalise || !rows_arg.is_none()) throw std::invalid_argument("scale, bias and rows need outs");
    for (int k = 0; k < views; ++k)
      outs.append(py::array_t<uint8_t>({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(3),
                                        static_cast<py::ssize_t>(sizes[k]), static_cast<py::ssize_t>(sizes[k])}));
  } else {
    outs = outs_arg.cast<py::list>();
  }
  if (static_cast<int>(outs.size()) != views) throw std::invalid_argument("outs needs one array per view");
  std::vector<int64_t> rows(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) rows[i] = i;
  if (!rows_arg.is_none()) {
    auto r = rows_arg.cast<py::array_t<int64_t, py::array::c_style | py::array::forcecast>>();
    if (r.ndim() != 1 || r.shape(0) != n) throw std::invalid_argument("rows must be [B]");
    std::copy(r.data(), r.data() + n, rows.begin());
  }
  py::array_t<float, py::array::c_style | py::array::forcecast> scale, bias;
  if (normalise) {
    scale = scale_arg.cast<decltype(scale)>();
    bias = bias_arg.cast<decltype(bias)>();
    if (scale.size() != 3 * views || bias.size() != 3 * views)
      throw std::invalid_argument("scale and bias must be [views, 3]");
  }
  std::vector<uint8_t*> u8(static_cast<size_t>(views) * n);
  std::vector<float*> f32(static_cast<size_t>(views) * n);
  for (int k = 0; k < views; ++k) {
    py::array a = outs[k];
    const size_t plane = static_cast<size_t>(3) * sizes[k] * sizes[k];
    const bool ok_dtype = normalise ? a.dtype().is(py::dtype::of<float>()) : a.dtype().is(py::dtype::of<uint8_t>());
    if (!ok_dtype || a.ndim() != 4 || a.shape(1) != 3 || a.shape(2) != sizes[k] || a.shape(3) != sizes[k] ||
        !(a.flags() & py::array::c_style) || !a.writeable())
      throw std::invalid_argument(std::string("outs[k] must be writable C-contiguous ") +
                                  (normalise ? "float32" : "uint8") + " [N, 3, out_size[k], out_size[k]]");
    for (int64_t i = 0; i < n; ++i) {
      if (rows[i] < 0 || rows[i] >= a.shape(0)) throw std::invalid_argument("rows out of range of outs");
      const size_t at = static_cast<size_t>(i) * views + k;
      if (normalise) f32[at] = static_cast<float*>(a.mutable_data()) + rows[i] * plane;
      else u8[at] = static_cast<uint8_t*>(a.mutable_data()) + rows[i] * plane;
    }
  }
  std::vector<std::string> errors(static_cast<size_t>(n));
  const int32_t* b = boxes.data();
  const uint8_t* f = flips.data();
  {
    py::gil_scoped_release release;
    for_rows(n, threads, [&](int64_t i) {
      rela::Output o;
      if (normalise) {
        o.f32 = f32.data() + static_cast<size_t>(i) * views;
        o.scale = scale.data();
        o.bias = bias.data();
      } else {
        o.u8 = u8.data() + static_cast<size_t>(i) * views;
      }
      errors[i] = rela::decode_resized_crops(static_cast<const uint8_t*>(data[i].ptr),
                                             static_cast<size_t>(data[i].size * data[i].itemsize), b + i * views * 4, f + i * views,
                                             views, sizes.data(), fit, o);
    });
  }
  py::list errs;
  for (auto& e : errors) errs.append(e);
  return py::make_tuple(outs, errs);
}

// (width, height, components, cmyk) of a JPEG from libjpeg's own header read; ValueError with
// libjpeg's message when it has none (not a JPEG, truncated header, zero width or height).
static py::tuple jpeg_header(const py::buffer& data) {
  const py::buffer_info info = data.request();
  rela::Header h;
  std::string error;
  {
    py::gil_scoped_release release;
    error = rela::read_header(static_cast<const uint8_t*>(info.ptr), static_cast<size_t>(info.size * info.itemsize), &h);
  }
  if (!error.empty()) throw py::value_error(error);
  return py::make_tuple(h.width, h.height, h.components, h.cmyk);
}
#endif

// Colour operations of one view on rows of a uint8 [N, 3, H, W] batch, in place; params [N, 12].
static void colour_batch(py::array_t<uint8_t, py::array::c_style> images,
                         py::array_t<double, py::array::c_style | py::array::forcecast> params, int threads) {
  if (images.ndim() != 4 || images.shape(1) != 3)
    throw std::invalid_argument("colour_batch: images must be uint8 [N, 3, H, W]");
  const int64_t n = images.shape(0);
  if (params.ndim() != 2 || params.shape(0) != n || params.shape(1) != rela::colour_layout().size)
    throw std::invalid_argument("colour_batch: params must be [N, " + std::to_string(rela::colour_layout().size) + "]");
  const int h = static_cast<int>(images.shape(2)), w = static_cast<int>(images.shape(3));
  const int width = rela::colour_layout().size;
  uint8_t* data = images.mutable_data();
  const double* p = params.data();
  py::gil_scoped_release release;
  for_rows(n, threads, [&](int64_t i) {
    rela::colour_image(data + static_cast<size_t>(i) * 3 * h * w, h, w, p + i * width);
  });
}

// Names joined by "\0" into one bytes object: Python splits it in one call, and decodes
// non-UTF-8 names with surrogateescape as os.scandir would.
static py::bytes joined(const std::vector<std::string>& names) {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    if (i) out.push_back('\0');
    out += names[i];
  }
  return py::bytes(out);
}

// List the directories root/rel for every rel in rels, `threads` at a time (each thread takes
// the next directory when it is done). One tuple per directory; see csrc/scan.h.
static py::list list_dirs(const std::string& root, const std::vector<std::string>& rels,
                          const std::vector<std::string>& extensions, int threads) {
  std::vector<rela::DirListing> out(rels.size());
  {
    py::gil_scoped_release release;
    std::atomic<size_t> next{0};
    auto work = [&]() {
      for (size_t i = next++; i < rels.size(); i = next++) out[i] = rela::list_dir(root, rels[i], extensions);
    };
    const int t = std::max(1, std::min<int>(threads, static_cast<int>(rels.size())));
    std::vector<std::thread> pool;
    for (int k = 1; k < t; ++k) pool.emplace_back(work);
    work();
    for (auto& th : pool) th.join();
  }
  py::list result;
  for (auto& d : out) {
    py::array_t<int64_t> sizes(static_cast<py::ssize_t>(d.sizes.size()));
    std::copy(d.sizes.begin(), d.sizes.end(), sizes.mutable_data());
    result.append(py::make_tuple(joined(d.images), sizes, joined(d.others), joined(d.subdirs),
                                 py::bytes(std::string(d.links.begin(), d.links.end())), py::bytes(d.error),
                                 py::make_tuple(d.mtime_ns, d.inode, d.device)));
  }
  return result;
}

// The colour parameter layout of csrc/views.cpp, by name, for rela._ext.pack_colour.
static py::dict colour_layout() {
  const rela::ColourLayout& l = rela::colour_layout();
  py::dict jitter, slots, layout;
  for (const auto& [name, code] : l.jitter) jitter[py::str(name)] = code;
  for (const auto& [name, at] : l.slots) slots[py::str(name)] = at;
  layout["size"] = l.size;
  layout["jitter_count"] = l.jitter_count;
  layout["jitter_ops"] = l.jitter_ops;
  layout["max_jitter"] = l.max_jitter;
  layout["jitter"] = jitter;
  layout["slots"] = slots;
  return layout;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "rela's compiled helpers: index sampling, JPEG crops, view colour operations";
  m.def("colour_layout", &colour_layout, "The slots colour_batch reads (csrc/views.h), by name.");
  m.def("list_dirs", &list_dirs, py::arg("root"), py::arg("rels"), py::arg("extensions"), py::arg("threads") = 8,
        "List image folders' directories in parallel: per directory (images, sizes, others, subdirs, links, "
        "error, (mtime_ns, inode, device)); names joined by NUL bytes.");
  m.def("permutation", &permutation, py::arg("n"), py::arg("seed"),
        "A seeded Fisher-Yates permutation of range(n) (xoshiro256**, portable stream).");
  m.def("uniform_subset", &uniform_subset, py::arg("n"), py::arg("k"), py::arg("seed"),
        "k distinct items of range(n), uniformly, in draw order (partial Fisher-Yates).");
  m.def("weighted_subset", &weighted_subset, py::arg("weights"), py::arg("k"), py::arg("seed"),
        py::arg("threads") = 1,
        "k distinct items drawn without replacement with probability proportional to weights "
        "(successive sampling), O(n) by exponential keys + radix select; sorted by index.");
  m.def("colour_batch", &colour_batch, py::arg("images"), py::arg("params"), py::arg("threads") = 1,
        "A view's colour operations (ColorJitter in the drawn order, grayscale, Gaussian blur, solarise; "
        "torchvision v2 semantics on uint8) on each row of a uint8 [N, 3, H, W] batch, in place.");
  m.def("draw_geometry", &draw_geometry, py::arg("prefix"), py::arg("indices"), py::arg("suffix"),
        py::arg("heights"), py::arg("widths"), py::arg("random"), py::arg("scale"), py::arg("ratio"),
        py::arg("flip"),
        "One view's crop boxes [N, 4] (top, left, h, w) and flips [N] for a batch, drawn as "
        "rela.loading.views.geometry draws them from sample i's stream SeedSequence([*prefix, "
        "indices[i], *suffix]) seeding a torch CPU generator (MT19937).");
#ifdef RELA_WITH_JPEG
  m.def("jpeg_header", &jpeg_header, py::arg("data"),
        "(width, height, components, cmyk) from libjpeg's jpeg_read_header: the size rela draws crop "
        "boxes in and checks the pixel limit against; ValueError with libjpeg's message otherwise.");
  m.def("decode_resized_crops", &decode_resized_crops, py::arg("jpegs"), py::arg("boxes"), py::arg("flips"),
        py::arg("out_size"), py::arg("threads") = 1, py::arg("outs") = py::none(), py::arg("rows") = py::none(),
        py::arg("scale") = py::none(), py::arg("bias") = py::none(), py::arg("fit") = 1.0,
        "Decode each JPEG once (only the region its views need; DCT-downscaled by 1/2 or 1/4 where every "
        "view's box still covers fit x its output; fit=0: full resolution) and resample every view's box to out_size x "
        "out_size RGB (out_size: one int, or one per view): ([views x uint8 [B,3,S,S]], errors). "
        "With outs (one [N,3,S,S] array per view) and rows, JPEG i lands in row rows[i]; with scale "
        "and bias ([views, 3]) the outs are float32, normalised as x * scale + bias.");
#endif
}
