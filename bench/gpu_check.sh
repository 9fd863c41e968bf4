#!/usr/bin/env bash
# The prepared GPU check: everything rela runs on a GPU, in one go, in about 6 minutes.
#
# For the GPU host users actually get, often air-gapped: its own PyTorch/Triton (any version
# rela supports), Python 3.10+, no network. Needs, beside a fresh clone:
#   .gpu-wheels/   lightly and the pure-Python packages it needs that such images lack
#                  (hydra-core, omegaconf, antlr4) — `make gpu-wheels` fetches them (< 1 MB) on a
#                  machine that reaches PyPI; carry the folder along with the checkout.
# The C++ extension is built in place (setuptools, pybind11 and a compiler from the host).
# DALI and FFCV may be absent: their rows are skipped with a message.
#
# Runs, each under its own time limit, everything logged to $OUT (default bench/out/gpu):
#   1. the CUDA-marked tests (tests/test_cuda.py): Triton kernels compiled for the GPU against
#      the float64 reference, the score table on the device, a bf16 + channels_last training step
#      with no host sync (torch.cuda sync debug mode), DALI mixed decode, 2-rank NCCL if 2 GPUs
#   2. bench/kernels.py --quick: the RELA loss kernel's GB/s against the device copy bandwidth
#   3. bench/loader.py --device cuda: the loaders, including rela's dali backend decoding on the GPU
#   4. bench/step.py: ResNet-50 at 224 px, RELA and BYOL phases, fp32 vs bf16 + channels_last,
#      rela's step against the bare loop, and with its Loader decoding synthetic JPEGs
# and ends with one summary table naming the device.
#
#   bash bench/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export RELA_GPU_CHECK=1 PYTHONUNBUFFERED=1
SUMMARY=()
WORKERS=$(( $(nproc) < 8 ? $(nproc) : 8 ))

stage() {  # stage NAME LIMIT_S COMMAND...: run, log, remember the outcome
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    SUMMARY+=("$(printf '%-10s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
    return 0
}

echo "== setup"
if ! $PY -c "import lightly" 2>/dev/null; then
    [ -d .gpu-wheels ] || { echo "lightly is missing and .gpu-wheels/ is not here: run 'make gpu-wheels' where PyPI is reachable"; exit 2; }
    $PY -m pip install -q --no-index --no-deps --find-links .gpu-wheels lightly hydra-core omegaconf antlr4-python3-runtime || exit 2
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$OUT/setup.log" 2>&1 \
    || { tail -n 30 "$OUT/setup.log"; echo "building rela in place failed (see $OUT/setup.log)"; exit 2; }
$PY - <<'PY'
import torch, triton
from rela import _ext
print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} x {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
      f"rela._C built: {_ext.has_jpeg_decoder()}")
PY

stage tests 150 $PY -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider -rs
stage kernels 60 $PY bench/kernels.py --quick --threads 1 --json "$OUT/kernels.json"
stage loader 90 $PY bench/loader.py --images 1000 --epochs 2 --workers $WORKERS --views 1 2 --device cuda
stage step 150 $PY bench/step.py --device cuda --arch resnet50 --width 1 --image-size 224 --batch-size 128 \
    --channels-last --precisions fp32,bf16 --steps 10 --repeats 3 --with-loader --jpegs --workers $WORKERS --handoff uint8

echo
echo "== summary: $($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")')"
printf '%s\n' "${SUMMARY[@]}"
grep -h "passed\|failed" "$OUT/tests.log" | tail -n 1
grep -h "% of copy" "$OUT/kernels.log" | sort -t= -k2 -n | tail -n 3
grep -h "ratios:" "$OUT/loader.log"
grep -hE "^(rela|ssl) " "$OUT/step.log"
