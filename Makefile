PYTHON ?= python3
export PYTHON

.PHONY: setup demo test test-latest constraints wheel lint bench gpu-wheels asan

setup:
	@bash scripts/setup.sh

# The short end-to-end benchmark (8 min 25 s here, measured on a quiet machine, setup included): converts 5k Fashion-MNIST images with the
# ImageNet EfficientNet-Lite0 prior, trains BYOL-100 (rela's and the plain-PyTorch reference) and
# RELA 20% / 50% for 8 epochs at the tuned baseline setting (lr 2e-3, crop min-scale 0.5: the
# best mean of bench/table1.py's 2-seed sweep, table in docs/benchmarks.md), prints the table and saves
# the plot; a line per arm shows progress. The whole Table 1 (sweep, priors x budgets, the other
# methods with their own sweeps, 2 seeds) takes ~95 minutes: python bench/table1.py --short --seeds 2 --method-seeds 2
demo: setup
	$(PYTHON) bench/end_to_end.py --short --lr 2e-3 --min-scale 0.5 --arms byol-100-reference rela-20 rela-50 --quiet

test: setup
	$(PYTHON) -m pytest -q

# The suite against the newest releases (resolved fresh in .venv-latest; `make test` stays on
# constraints.txt). When it is green, `make constraints` moves the pins to what it just passed with.
test-latest:
	bash scripts/test_latest.sh

constraints:
	{ sed -n '1,3p' constraints.txt; .venv-latest/bin/python -m pip freeze --exclude-editable 2>/dev/null \
	  | grep -v '^rela-accel'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

# The wheel alone: built from a clean copy, installed into a fresh venv, used from outside the
# checkout (also part of `make test`).
wheel: setup
	$(PYTHON) -m pytest -q tests/test_wheel.py

# rela._C under AddressSanitizer + UBSan, running the JPEG fuzz corpus (once per change to csrc/).
asan: setup
	bash scripts/asan.sh

lint: setup
	$(PYTHON) -m ruff check .

bench: setup
	$(PYTHON) bench/convert.py
	$(PYTHON) bench/kernels.py
	$(PYTHON) bench/resample.py
	$(PYTHON) bench/loader.py
	$(PYTHON) bench/lightly_loader.py
	$(PYTHON) bench/scale.py
	$(PYTHON) bench/scaling.py
	$(PYTHON) bench/end_to_end.py --extra --quiet

# What bench/gpu_check.sh needs beside a fresh clone on an air-gapped GPU host whose image lacks
# them: lightly and its pure-Python dependencies, as wheels (< 1 MB), in .gpu-wheels/.
gpu-wheels:
	$(PYTHON) -m pip wheel -q --no-deps -w .gpu-wheels lightly==1.6.0 hydra-core==1.3.8 omegaconf==2.3.1 \
		antlr4-python3-runtime==4.9.3
