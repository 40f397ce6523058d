# Set-up and entry points. `make demo` and `make test` work on a fresh machine: they build the virtual
# environment first (torch pinned before anything else: a bare `torch` requirement pulls the CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.lctrain-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/lctrain train configs/demo.yaml --nproc 4

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/lctrain bench sp

clean:
	rm -rf $(VENV) runs .pytest_cache build *.egg-info
