"""The GPU image's versions agree: docker/resolve.py replays the Dockerfile's install layers with pip's
`--dry-run --report` against constraints.txt (for the image's Python, torch recorded as already installed) and
fails if torch would be replaced, a pin conflicts, a package pip picks is unpinned, a pin is unused, nvcc is not
torch's CUDA release or the Dockerfile lost what bounds and pins the flash-attn build. The full resolution needs
the package index (skipped with the reason without it, never passed); the checks of its parts run offline. The CPU
installs' lock is derived from the same file, and `make install` uses it."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docker"))
import resolve  # noqa: E402

sys.path.pop(0)


@pytest.mark.slow
def test_image_install_set_resolves_against_the_lock():
    res = subprocess.run([sys.executable, str(ROOT / "docker/resolve.py")], capture_output=True, text=True,
                         timeout=1200)
    out = (res.stdout + res.stderr).strip()
    if res.returncode == 77:
        pytest.skip(f"cannot check the image lock here: {out.splitlines()[-1] if out else 'index unreachable'}")
    assert res.returncode == 0, out
    assert "resolved" in out and "problem:" not in out
    nvcc = re.search(r"nvcc (\S+), CUDA runtime (\S+),", out)
    assert nvcc and nvcc.group(1).split(".")[:2] == nvcc.group(2).split(".")[:2], out


def test_nvcc_must_be_torchs_cuda_release():
    torch_requires = ["cuda-toolkit[cublas,cudart]==13.2.2; platform_system == \"Linux\"", "filelock"]
    ok = {"nvidia-cuda-nvcc": "13.2.86", "nvidia-cuda-runtime": "13.2.86"}
    assert resolve.cuda_problems(ok, torch_requires) == []
    older = resolve.cuda_problems({**ok, "nvidia-cuda-nvcc": "13.0.88"}, torch_requires)
    assert any("nvcc is CUDA 13.0 but torch's CUDA runtime is 13.2" in p for p in older), older
    assert any("no nvcc" in p for p in resolve.cuda_problems({"nvidia-cuda-runtime": "13.2.86"}, torch_requires))


def test_dockerfile_keeps_one_cuda_and_a_bounded_pinned_build():
    text = (ROOT / "docker/Dockerfile").read_text() + (ROOT / "docker/build_flash_attn.sh").read_text()
    assert resolve.dockerfile_problems(text) == []
    old_base = text.replace("FROM ubuntu:24.04", "FROM nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04")
    assert any("no CUDA of its own" in p for p in resolve.dockerfile_problems(old_base))
    for cut in ("FLASH_ATTENTION_FORCE_BUILD=TRUE", "MAX_JOBS=", "libibverbs1", '".[gpu]"'):
        assert any(repr(cut) in p for p in resolve.dockerfile_problems(text.replace(cut, ""))), cut


def test_cpu_lock_is_the_lock_minus_torchs_cuda_build(tmp_path):
    pins = resolve.read_pins()
    out = tmp_path / "cpu.txt"
    assert resolve.main(["--cpu-lock", str(out), "--torch", "torch==2.13.0"]) == 0
    cpu = resolve.read_pins(out)
    cuda = {n for n in pins if n == "torch" or n.startswith(("nvidia-", "cuda-"))}
    assert cuda >= {"torch", "nvidia-cuda-nvcc", "nvidia-nccl-cu13", "cuda-toolkit"}
    assert cpu == {**{n: v for n, v in pins.items() if n not in cuda}, "torch": "2.13.0"}
    assert cpu["triton"] == pins["triton"] and cpu["fla-core"] == pins["fla-core"]
    with pytest.raises(ValueError, match="exact pin"):
        resolve.cpu_lock("torch>=2.6")


def test_make_install_uses_the_derived_lock_and_holds_torch():
    dry = subprocess.run(["make", "-n", "-B", "install", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    lock = "/nonexistent-venv/constraints-cpu.txt"
    assert f"docker/resolve.py --cpu-lock {lock}" in dry
    pip_installs = [ln for ln in dry.splitlines() if " -m pip install " in ln and "--upgrade pip" not in ln]
    assert len(pip_installs) == 2 and all(f"-c {lock}" in ln for ln in pip_installs), pip_installs
    assert '"torch==2.13.0"' in pip_installs[0] and '-e ".[dev]"' in pip_installs[1]
    assert "pip check" in dry
