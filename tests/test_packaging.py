"""One packaging path (pyproject's package-dir): kernels/ and launch/ are lctrain.kernels and lctrain.launch in an
editable install and in a wheel alike, the wheel carries the recipes, and nothing else becomes importable."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from lctrain.launch.jobs import build_wheel

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"lctrain": "lctrain", "kernels": "lctrain.kernels", "launch": "lctrain.launch"}
RECIPES = ["lctrain/launch/slurm/lctrain.sbatch", "lctrain/launch/k8s/raycluster.yaml",
           "lctrain/launch/k8s/rayjob.yaml"]


def _source_packages() -> set[str]:
    """Every committed directory with an __init__.py under lctrain/, kernels/, launch/, as its import name."""
    res = subprocess.run(["git", "ls-files", "--", *(f"{top}/**__init__.py" for top in MAPPING)], cwd=ROOT,
                         capture_output=True, text=True)
    files = res.stdout.split() if res.returncode == 0 else [
        str(p.relative_to(ROOT)) for top in MAPPING for p in (ROOT / top).rglob("__init__.py")]
    out = set()
    for f in files:
        top, *rest = Path(f).parent.parts
        out.add(".".join([MAPPING[top], *rest]))
    return out


def test_pyproject_lists_every_package():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    missing = _source_packages() - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml (wheels miss them)"
    assert tool["package-dir"] == {"lctrain": "lctrain", "lctrain.kernels": "kernels", "lctrain.launch": "launch"}
    assert not (ROOT / "setup.py").exists()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


def test_wheel_holds_the_mapped_packages_and_recipes(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in _source_packages():
        assert pkg.replace(".", "/") + "/__init__.py" in names, pkg
    for rel in RECIPES:
        assert rel in names, rel
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"lctrain", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops


@pytest.mark.slow
def test_wheel_install_imports_from_anywhere(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, env={**os.environ,
                                                                                   "PIP_CONFIG_FILE": os.devnull})
    code = ("import importlib.util, lctrain.kernels.lightning_attention as k, lctrain.launch.cli as c; "
            "print(k.__file__); print(c.__file__); "
            "print(importlib.util.find_spec('lctrain.tests'), importlib.util.find_spec('lctrain.configs'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(target)}).stdout.split("\n")
    assert out[0].startswith(str(target / "lctrain/kernels")) and out[1].startswith(str(target / "lctrain/launch"))
    assert out[2] == "None None"
    assert (target / "lctrain/launch/slurm/lctrain.sbatch").is_file()


def test_editable_install_maps_the_checkout():
    """The venv's editable install (pip install -e ., as the Makefile and CI do), seen from outside the checkout
    and as the tests' spawned ranks see it (python -m lctrain from the repository root)."""
    code = ("import importlib.util, lctrain, lctrain.kernels, lctrain.launch; "
            "print(lctrain.kernels.__file__, lctrain.launch.__file__, importlib.util.find_spec('lctrain.tests'))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(ROOT / "kernels/__init__.py"), str(ROOT / "launch/__init__.py"), "None"]
    res = subprocess.run([sys.executable, "-m", "lctrain", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "launch" in res.stdout


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _lock():
    sys.path.insert(0, str(ROOT / "docker"))
    try:
        import resolve
    finally:
        sys.path.pop(0)
    return resolve


def test_one_python_floor_everywhere():
    resolve = _lock()
    floor = tuple(map(int, resolve.FLOOR_PYTHON.split(".")))
    assert _project()["requires-python"] == f">={resolve.FLOOR_PYTHON}"
    assert tuple(map(int, resolve.IMAGE_PYTHON.split("."))) >= floor and sys.version_info[:2] >= floor


def test_dependency_floors_admit_the_lock_and_the_gpu_extra_needs_no_build():
    """Every dependency's range holds the locked version (floors match what the lock ships: ray >= 2.52 for token
    authentication), and `pip install .[gpu]` installs wheels only: nothing in it needs torch to build (flash-attn
    is built by docker/build_flash_attn.sh / `make install-gpu`, after torch)."""
    from packaging.requirements import Requirement

    pins = _lock().read_pins()
    project = _project()
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]]
    for req in reqs:
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req} is not in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} excludes the locked {pins[name]}"
    by_name = {r.name: r for r in reqs}
    assert not by_name["ray"].specifier.contains("2.51.0") and by_name["ray"].specifier.contains("2.52.0")
    assert "flash-attn" not in by_name and "fla-core" in by_name
