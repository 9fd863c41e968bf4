#!/usr/bin/env bash
# Install everything rela needs on a fresh machine; a second run installs nothing.
# Used by `make demo` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# 1. Debian packages (only as root; otherwise say what is missing).
DEB_PKGS="dataset-fashion-mnist libjpeg-dev"  # libjpeg-dev: rela._C's JPEG crop decoder
# The ffcv and dali backends (and the benchmark baselines) are installed by default, so the
# tests exercise them; `--minimal` leaves them out (rela then runs its torch backend only).
BACKENDS=1
[ "${1:-}" = "--minimal" ] && BACKENDS=0
# FFCV builds from source against libjpeg-turbo and OpenCV (about 690 MB of Debian packages).
[ $BACKENDS = 1 ] && DEB_PKGS="$DEB_PKGS libturbojpeg0-dev libopencv-dev pkg-config"
# SPDL (a bench/views.py peer) decodes through FFmpeg's shared libraries (Debian's FFmpeg 5).
[ $BACKENDS = 1 ] && DEB_PKGS="$DEB_PKGS libavdevice59"
missing=""
for p in $DEB_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
  else
    echo "setup: missing Debian packages:$missing (run: sudo apt-get install$missing)" >&2
  fi
fi

# Every pip install below goes through constraints.txt: the versions the suite last passed with, so
# a new day's releases can't break a fresh clone (`make test-latest` tries them on purpose).
# RELA_CONSTRAINTS=none resolves fresh (what scripts/test_latest.sh does in its own venv).
CONSTRAINTS=${RELA_CONSTRAINTS:-constraints.txt}
PIP_C="--upgrade --upgrade-strategy eager"  # fresh: the newest releases the ranges admit
[ "$CONSTRAINTS" != none ] && PIP_C="-c $CONSTRAINTS"

# 2. PyTorch first, pinned, so pip keeps it when resolving the project's ranges.
TORCH_SPEC=${RELA_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if ! $PY -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "setup: pip install $TORCH_SPEC"
  $PY -m pip install -q $TORCH_SPEC
fi

# 3. The project itself (editable, with its C++ extension and dev tools). Redone only when
#    the build inputs changed since the last install.
STAMP=.make/installed$([ "$CONSTRAINTS" = none ] && echo -latest || true)
mkdir -p .make
inputs=$(cat pyproject.toml setup.py CMakeLists.txt csrc/* "$([ "$CONSTRAINTS" != none ] && echo "$CONSTRAINTS" || echo /dev/null)" \
  | sha256sum | cut -c1-16)
# Which checkout the installed `rela` points at (asked from outside this folder, so the
# working directory can't shadow it): another clone's editable install doesn't count.
installed=$(cd / && $PY -c "import rela, os; print(os.path.dirname(os.path.dirname(rela.__file__)))" 2>/dev/null || true)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$inputs" ] || [ "$installed" != "$(pwd -P)" ] \
   || ! $PY -c "import rela._C, efficientnet_lite_pytorch, pytest" >/dev/null 2>&1; then
  echo "setup: pip install -e .[dev] $PIP_C"
  $PY -m pip install -q $PIP_C -e ".[dev]"
  echo "$inputs" > "$STAMP"
fi

# 4. The FFCV and DALI backends (DALI's CPU pipelines work without a GPU), and SPDL (a benchmark peer).
if [ $BACKENDS = 1 ]; then
  $PY -c "import ffcv" >/dev/null 2>&1 || { echo "setup: pip install ffcv"; $PY -m pip install -q $PIP_C "ffcv==1.0.2" numba opencv-python-headless; }
  $PY -c "import nvidia.dali" >/dev/null 2>&1 || { echo "setup: pip install nvidia-dali-cuda130"; $PY -m pip install -q $PIP_C nvidia-dali-cuda130; }
  $PY -c "import spdl.pipeline" >/dev/null 2>&1 || { echo "setup: pip install spdl"; $PY -m pip install -q $PIP_C spdl; }
fi
