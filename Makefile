# Set-up and entry points. `make demo` and `make test` work on a fresh machine: they build the virtual
# environment first, with the lock (constraints.txt, the versions the image and the clusters run). CPU installs use
# the lock minus torch's CUDA build, derived by docker/resolve.py --cpu-lock into $(CPU_LOCK), with torch held at
# $(TORCH) (the local CPU wheel): pip can neither replace torch nor pick an unlocked version of anything pinned.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
LOCK := constraints.txt
CPU_LOCK := $(VENV)/constraints-cpu.txt
STAMP := $(VENV)/.lctrain-installed
PYTEST_ARGS ?=

.PHONY: install install-gpu demo test test-fast bench clean gpu-check gpu-wheels

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) docker/resolve.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) docker/resolve.py --cpu-lock $(CPU_LOCK) --torch "$(TORCH)"
	$(PY) -m pip install -q -c $(CPU_LOCK) "$(TORCH)"
	$(PY) -m pip install -q -c $(CPU_LOCK) -e ".[dev]"
	$(PY) -m pip check
	touch $@

# A GPU node without the image (SLURM LCTRAIN_CONTAINER=none): the image's layers in the image's order -- torch
# from the lock (CUDA build), flash-attn's build tools with nvcc of torch's CUDA release, flash-attn compiled
# against that torch (docker/build_flash_attn.sh: memory bounded, ~18 GB at FLASH_ATTN_MAX_JOBS=4), then lctrain
# with the gpu extra (fla). Needs a g++ and, for multi-node NCCL over InfiniBand/RoCE, rdma-core + libibverbs.
install-gpu:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c $(LOCK) torch
	$(PY) -m pip install -c $(LOCK) -r docker/requirements-build.txt
	docker/build_flash_attn.sh $(PY) $(LOCK)
	$(PY) -m pip install -c $(LOCK) -e ".[gpu]"
	$(PY) -m pip check

demo: install
	$(VENV)/bin/lctrain train configs/demo.yaml --nproc 4

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/lctrain bench sp

# On a GPU machine, in a fixed time budget: install the carried wheels (.whl/, made by gpu-wheels), then PART
# (kernels: validate every backend and record it, GPU tests, kernel benchmark; sp: syncs per steady-state step, SP
# benchmark; train: a real run's peak memory against lctrain rehearse's; all). Everything goes under OUT, the
# summary (<= 12 KB) is printed last. On CPU it prints the plan. Uses the machine's python3 there.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
OUT ?= /tmp/lctrain-gpu-check
PART ?= all
gpu-check:
	$(GPU_PY) scripts/gpu_check.py --out "$(OUT)" --part $(PART)

# Wheels the GPU image lacks (cp312, manylinux x86_64), downloaded here for a device call to carry as .whl/
gpu-wheels:
	mkdir -p .whl
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl flash-linear-attention fla-core "megatron-core>=0.16,<0.17" "setuptools>=77"

clean:
	rm -rf $(VENV) runs .pytest_cache build *.egg-info
