"""`make gpu-check`'s script: on a machine without CUDA it prints what it would run and exits 0."""
import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_the_plan(gpu_check, capsys, tmp_path):
    out = tmp_path / "gpu_check.md"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for expected in ("pytest -q -m gpu tests/kernels", "benchmarks/bench_kernels.py", "lctrain bench sp"):
        assert expected in text
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_without_cuda_it_runs_nothing_and_succeeds(gpu_check, capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path / "g.md")]) == 0
    assert "no CUDA GPU here" in capsys.readouterr().out


def test_several_gpus_use_torchrun(gpu_check, tmp_path):
    args = gpu_check.argparse.Namespace(wheels=str(tmp_path), site="/tmp/s", kernel_table="k.md", seqlens=[4096])
    commands = [" ".join(cmd) for _, cmd in gpu_check.plan(args, 8)]
    assert any("torch.distributed.run --nproc-per-node=8" in c for c in commands)
    assert any("--world 1" in c for c in (" ".join(cmd) for _, cmd in gpu_check.plan(args, 1)))
