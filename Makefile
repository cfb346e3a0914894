# The two commands README promises: `make quickstart` and `make test` do all the set-up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install quickstart test test-fast bench clean

install: $(STAMP)

# Re-runs only when the pins or the project metadata change (quick when already done).
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e '.[test]'
	touch $(STAMP)

quickstart: install
	$(BIN)/mtssl fit --config configs/quickstart.yaml

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# every benchmark in turn; regenerates docs/benchmarks.md and docs/img/*.png (~15 min on 2 idle CPU cores)
bench: install
	$(BIN)/python -m benchmarks

clean:
	rm -rf runs wandb lightning_logs .pytest_cache
