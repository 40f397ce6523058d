#!/usr/bin/env bash
# Build and install flash-attn (the lock's version) against the torch installed in PYTHON's environment, compiled by
# the nvcc of the lock's cuda-toolkit (the CUDA release torch was built with; docker/requirements-build.txt must be
# installed first). Used by docker/Dockerfile and `make install-gpu`.
#   docker/build_flash_attn.sh PYTHON CONSTRAINTS
# Memory: about 4.5 GB per compile job at NVCC_THREADS=2 for two architectures (flash-attn's own estimate is 9 GB
# per job at 4 threads), so FLASH_ATTN_MAX_JOBS=4 (the default) needs ~18 GB of RAM; use RAM_GB / 5 jobs on a
# smaller builder. FLASH_ATTENTION_FORCE_BUILD: compile, never download a prebuilt wheel guessed from the versions.
set -euo pipefail
PYTHON=${1:?usage: build_flash_attn.sh PYTHON CONSTRAINTS}
CONSTRAINTS=${2:?usage: build_flash_attn.sh PYTHON CONSTRAINTS}
# pip's CUDA 13 wheels keep the toolkit in site-packages/nvidia/cu13 (bin, include, lib)
CUDA_HOME=$("$PYTHON" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))")
export CUDA_HOME
test -x "$CUDA_HOME/bin/nvcc" || { echo "no nvcc in $CUDA_HOME: install docker/requirements-build.txt first" >&2; exit 1; }
ln -sf libcudart.so.13 "$CUDA_HOME/lib/libcudart.so"  # the link step wants the unversioned name
"$CUDA_HOME/bin/nvcc" --version | tail -2
MAX_JOBS=${FLASH_ATTN_MAX_JOBS:-4} NVCC_THREADS=${FLASH_ATTN_NVCC_THREADS:-2} FLASH_ATTN_CUDA_ARCHS="80;90" \
    FLASH_ATTENTION_FORCE_BUILD=TRUE "$PYTHON" -m pip install -c "$CONSTRAINTS" --no-build-isolation --no-deps flash-attn
"$PYTHON" -c "import flash_attn, torch; print('flash-attn', flash_attn.__version__, 'torch', torch.__version__, 'CUDA', torch.version.cuda)"
