#!/usr/bin/env bash
# `make asan`: rela._C built with AddressSanitizer + UndefinedBehaviorSanitizer (build/asan/), then
# the JPEG fuzz corpus (tests/fuzz_jpeg.py, the default suite's) and the decoder's own tests run
# against that build. Any out-of-bounds access, use-after-free or undefined behaviour aborts with
# the sanitizer's report. Run it once per change to csrc/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=build/asan
$PY -c "import pybind11" 2>/dev/null || $PY -m pip install -q "pybind11>=2.12"  # a build requirement, not installed by -e .
FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1"
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS="$FLAGS" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$($PY -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/$BUILD/out" >/dev/null
cmake --build "$BUILD" --parallel "$(nproc)" >/dev/null
so=$(ls "$BUILD"/out/_C*.so)
# Python itself is not instrumented: the runtime is preloaded; leaks are the interpreter's, not ours.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
echo "asan: $so"
$PY -m tests.fuzz_jpeg --count "${FUZZ_COUNT:-3000}" --ext "$so"
