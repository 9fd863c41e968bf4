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
#include "sampling.h"
#include "scan.h"
#include "views.h"

namespace py = pybind11;

// fn(i) for every row i < n, rows dealt by stride to min(threads, n) threads (the caller's among them).
template <typename Fn>
static void for_rows(int64_t n, int threads, const Fn& fn) {
  auto work = [&](int64_t lo, int64_t step) {
    for (int64_t i = lo; i < n; i += step) fn(i);
  };
  const int t = std::max(1, std::min<int>(threads, static_cast<int>(n)));
  std::vector<std::thread> pool;
  for (int k = 1; k < t; ++k) pool.emplace_back(work, k, t);
  work(0, t);
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

#ifdef RELA_WITH_JPEG
// Batch of JPEGs -> per view a uint8 [B, 3, S, S] array; errors[i] is "" or libjpeg's message.
static py::tuple decode_resized_crops(const py::list& jpegs,
                                     py::array_t<int32_t, py::array::c_style | py::array::forcecast> boxes,
                                     py::array_t<uint8_t, py::array::c_style | py::array::forcecast> flips,
                                     int out_size, int threads) {
  const int64_t n = static_cast<int64_t>(jpegs.size());
  if (boxes.ndim() != 3 || boxes.shape(0) != n || boxes.shape(2) != 4)
    throw std::invalid_argument("boxes must be [B, views, 4] (top, left, height, width)");
  const int views = static_cast<int>(boxes.shape(1));
  if (flips.ndim() != 2 || flips.shape(0) != n || flips.shape(1) != views)
    throw std::invalid_argument("flips must be [B, views]");
  if (out_size < 1) throw std::invalid_argument("out_size must be positive");
  std::vector<std::string> data;
  data.reserve(static_cast<size_t>(n));
  for (const auto& item : jpegs) data.emplace_back(item.cast<std::string>());
  py::list outs;
  std::vector<uint8_t*> ptrs(static_cast<size_t>(views) * n);
  for (int k = 0; k < views; ++k) {
    py::array_t<uint8_t> a({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(3),
                            static_cast<py::ssize_t>(out_size), static_cast<py::ssize_t>(out_size)});
    for (int64_t i = 0; i < n; ++i)
      ptrs[static_cast<size_t>(i) * views + k] = a.mutable_data() + static_cast<size_t>(i) * out_size * out_size * 3;
    outs.append(a);
  }
  std::vector<std::string> errors(static_cast<size_t>(n));
  const int32_t* b = boxes.data();
  const uint8_t* f = flips.data();
  {
    py::gil_scoped_release release;
    for_rows(n, threads, [&](int64_t i) {
      errors[i] = rela::decode_resized_crops(reinterpret_cast<const uint8_t*>(data[i].data()), data[i].size(),
                                             b + i * views * 4, f + i * views, views, out_size,
                                             ptrs.data() + static_cast<size_t>(i) * views);
    });
  }
  py::list errs;
  for (auto& e : errors) errs.append(e);
  return py::make_tuple(outs, errs);
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
#ifdef RELA_WITH_JPEG
  m.def("decode_resized_crops", &decode_resized_crops, py::arg("jpegs"), py::arg("boxes"), py::arg("flips"),
        py::arg("out_size"), py::arg("threads") = 1,
        "Decode each JPEG once (only the region its views need, DCT-downscaled when possible) and "
        "resample every view's box to out_size x out_size RGB: ([views x uint8 [B,3,S,S]], errors).");
#endif
}
