PYTHON ?= python3
export PYTHON

.PHONY: setup demo test lint bench

setup:
	@bash scripts/setup.sh

# Convert the first 10k Fashion-MNIST training images with the ImageNet EfficientNet-Lite0
# prior at 64 px into a 64-d target store, then print its summary.
demo: setup
	$(PYTHON) -m rela convert --data fashion-mnist --limit 10000 --prior efficientnet-lite0 \
		--input-size 64 --dim 64 --out runs/demo-store
	$(PYTHON) -m rela info runs/demo-store

test: setup
	$(PYTHON) -m pytest -q

lint: setup
	$(PYTHON) -m ruff check .

bench: setup
	$(PYTHON) bench/convert.py
	$(PYTHON) bench/kernels.py
	$(PYTHON) bench/resample.py
	$(PYTHON) bench/loader.py
