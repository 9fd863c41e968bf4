// rela._C: the compiled helpers behind rela's index sampling. Every function releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "sampling.h"

namespace py = pybind11;

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

PYBIND11_MODULE(_C, m) {
  m.doc() = "rela's compiled index-sampling helpers";
  m.def("permutation", &permutation, py::arg("n"), py::arg("seed"),
        "A seeded Fisher-Yates permutation of range(n) (xoshiro256**, portable stream).");
  m.def("uniform_subset", &uniform_subset, py::arg("n"), py::arg("k"), py::arg("seed"),
        "k distinct items of range(n), uniformly, in draw order (partial Fisher-Yates).");
  m.def("weighted_subset", &weighted_subset, py::arg("weights"), py::arg("k"), py::arg("seed"),
        py::arg("threads") = 1,
        "k distinct items drawn without replacement with probability proportional to weights "
        "(successive sampling), O(n) by exponential keys + radix select; sorted by index.");
}
