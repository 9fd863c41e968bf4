#!/usr/bin/env bash
# `make test-latest`: the suite against the newest releases rela's version ranges admit, resolved
# fresh, in .venv-latest — so upstream drift is found here on purpose, not by a user on the day of
# a release. The venv reuses this interpreter's torch and torchvision (a plain path, no .pth hooks:
# pip's cap keeps them at the pinned version anyway) and installs everything else anew; the
# environment `make test` uses is left as it is. Green here → `make constraints` to move the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${PYTHON:-python3}
VENV=.venv-latest
if [ ! -f "$VENV/.ready" ]; then
  rm -rf "$VENV"
  $BASE -m venv "$VENV"
  torch_site=$($BASE -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
  site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$torch_site" > "$site/base-site-packages.pth"
  touch "$VENV/.ready"
fi
PYTHON="$VENV/bin/python" RELA_CONSTRAINTS=none bash scripts/setup.sh
"$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|timm|lightly|lightning|numpy|open.clip.torch|datasets|kernels|ffcv|nvidia-dali-cuda130)==' \
  | tr '\n' ' ' | sed 's/^/test-latest: resolved /; s/$/\n/'
"$VENV/bin/python" -m pytest -q "$@"
