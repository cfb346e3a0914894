# The two commands README promises: `make quickstart` and `make test` do all the set-up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# TensorFlow + TF-slim live in their own environment: only the slim parity test's reference needs them
TF_VENV := .venv-tf
TF_STAMP := $(TF_VENV)/.installed-stamp
SLIM_REFERENCE := build/slim-reference

.PHONY: install quickstart test test-fast bench clean slim-reference gpu-wheels gpu-check

install: $(STAMP)

# Re-runs only when the pins or the project metadata change (quick when already done).
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e '.[test]'
	touch $(STAMP)

quickstart: install
	$(BIN)/mtssl fit --config configs/quickstart.yaml

test: install slim-reference
	MTSSL_SLIM_REFERENCE=$(SLIM_REFERENCE) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# TF-slim's own resnet_v2_50/101 with random weights: real TF checkpoints + end-points on fixed
# images, which tests/slim/test_slim_parity.py converts and compares with ResNetV2 (~1 min + the install)
slim-reference: $(SLIM_REFERENCE)/done

$(TF_STAMP): requirements/tf-reference.txt
	test -x $(TF_VENV)/bin/python || $(PYTHON) -m venv $(TF_VENV)
	$(TF_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/tf-reference.txt
	touch $(TF_STAMP)

$(SLIM_REFERENCE)/done: $(TF_STAMP) tests/slim/make_reference.py
	TF_CPP_MIN_LOG_LEVEL=2 $(TF_VENV)/bin/python tests/slim/make_reference.py $(SLIM_REFERENCE)

# every benchmark in turn; regenerates docs/benchmarks.md and docs/img/*.png (~15 min on 2 idle CPU cores)
bench: install
	$(BIN)/python -m benchmarks

# The GPU check runs on a GPU machine's own Python (torch >= 2.11, no registry there): what that Python
# lacks travels as wheels made here (requirements/gpu-wheels.txt; CPython 3.12, manylinux x86-64, ~8 MiB)
GPU_WHEELS := build/gpu-wheels
# this checkout's environment when there is one (here), else the machine's python3 (a GPU machine)
GPU_PYTHON ?= $(shell test -x $(BIN)/python && echo $(BIN)/python || echo python3)

gpu-wheels: $(GPU_WHEELS)/done

$(GPU_WHEELS)/done: requirements/gpu-wheels.txt
	rm -rf $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --platform any -d $(GPU_WHEELS) -r requirements/gpu-wheels.txt
	du -sh $(GPU_WHEELS) && ls $(GPU_WHEELS)
	touch $@

# one command, under 8 minutes on one H100/H200: writes the GPU section of docs/benchmarks.md and docs/gpu_check.json
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --wheels $(GPU_WHEELS)

clean:
	rm -rf runs wandb lightning_logs .pytest_cache $(SLIM_REFERENCE)
