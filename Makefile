# Set-up and entry points. `make demo` and `make test` work on a fresh machine: they build the virtual
# environment first (torch pinned before anything else: a bare `torch` requirement pulls the CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.lctrain-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench clean gpu-check gpu-wheels

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

# On a GPU machine: install the carried wheels (.whl/, made by gpu-wheels), run the GPU tests and the kernel and
# SP benchmarks, write docs/gpu_check.md. On CPU it prints what it would run. Uses the machine's python3 there.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) scripts/gpu_check.py

# Wheels the GPU image lacks (cp312, manylinux x86_64), downloaded here for a device call to carry as .whl/
gpu-wheels:
	mkdir -p .whl
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl flash-linear-attention fla-core "megatron-core>=0.16,<0.17" "setuptools>=77"

clean:
	rm -rf $(VENV) runs .pytest_cache build *.egg-info
