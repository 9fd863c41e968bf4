PYTHON ?= python3
export PYTHON

.PHONY: setup demo test wheel lint bench

setup:
	@bash scripts/setup.sh

# The short end-to-end benchmark: converts 5k Fashion-MNIST images with the ImageNet
# EfficientNet-Lite0 prior (and a random prior), tunes the BYOL baseline first (crop scale x lr,
# 5 runs), trains the BYOL arms (rela's and the plain-PyTorch reference) and the RELA arms for
# 8 epochs at the tuned setting, prints the tables and saves the plot; progress bars show while
# arms train.
demo: setup
	$(PYTHON) bench/end_to_end.py --short --sweep

test: setup
	$(PYTHON) -m pytest -q

# The wheel alone: built from a clean copy, installed into a fresh venv, used from outside the
# checkout (also part of `make test`).
wheel: setup
	$(PYTHON) -m pytest -q tests/test_wheel.py

lint: setup
	$(PYTHON) -m ruff check .

bench: setup
	$(PYTHON) bench/convert.py
	$(PYTHON) bench/kernels.py
	$(PYTHON) bench/resample.py
	$(PYTHON) bench/loader.py
	$(PYTHON) bench/scaling.py
	$(PYTHON) bench/end_to_end.py --extra --quiet
