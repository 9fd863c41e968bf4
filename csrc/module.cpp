// rela._C: the compiled helpers behind rela's index sampling. Every function releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>

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

PYBIND11_MODULE(_C, m) {
  m.doc() = "rela's compiled index-sampling helpers";
  m.def("permutation", &permutation, py::arg("n"), py::arg("seed"),
        "A seeded Fisher-Yates permutation of range(n) (xoshiro256**, portable stream).");
}
