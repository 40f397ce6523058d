"""Resolve the GPU image's Python install set against constraints.txt with pip, as the Dockerfile installs it.

    python docker/resolve.py            # check: exit 0 if the lock holds, 1 with the reasons, 77 if PyPI is unreachable
    python docker/resolve.py --write    # rewrite constraints.txt's pins from a fresh resolution (after a bump)
    python docker/resolve.py --cpu-lock .venv/constraints-cpu.txt --torch torch==2.13.0   # CPU installs' lock

The Dockerfile installs in three layers, and this script replays them with `pip install --dry-run --report` in an
empty virtual environment of the image's Python (3.12, Ubuntu 24.04's):
  1. the base: `torch`, at the version constraints.txt pins (with its CUDA wheels);
  2. on top of that torch, with torch recorded as already installed (a stand-in dist-info carrying the real
     wheel's metadata, so its CUDA/triton requirements are resolved too): flash-attn's build tools
     (docker/requirements-build.txt: nvcc from cuda-toolkit[nvcc,cccl]) and lctrain's dependencies with the `gpu`
     extra (fla-core) from pyproject.toml. pip must keep the installed torch; if anything would replace it, the
     lock is broken;
  3. flash-attn itself is built `--no-deps --no-build-isolation` against that torch, so it is pinned but not
     resolved here (its sdist imports torch to build metadata); its own requirements are in layer 2.
Every package pip picks must be pinned in constraints.txt at the version it picks, and every pin must be used.
flash-attn must be compiled by the CUDA torch was built with: the nvcc pip picks (nvidia-cuda-nvcc) must have the
CUDA major.minor of torch's runtime (nvidia-cuda-runtime) and of torch's own cuda-toolkit requirement, and the
Dockerfile must bring no other CUDA (a base image without one), force the source build (no guessed prebuilt
wheel) and bound its memory (MAX_JOBS, NVCC_THREADS); `dockerfile_problems` checks the Dockerfile's text.
Only the standard library is needed; pip runs from this interpreter (`pip --python` targets the empty venv).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
BUILD_REQUIREMENTS = ROOT / "docker/requirements-build.txt"
IMAGE_PYTHON = "3.12"
FLOOR_PYTHON = "3.11"
"""The project's requires-python floor (CI's Python): `--write` resolves there first, so every pin installs on it."""
UBUNTU = "24.04"
"""The image's Python is Ubuntu 24.04's python3; the Dockerfile's FROM line must stay on it."""
NOT_RESOLVED = {"flash-attn"}
"""Pinned, built against the installed torch without dependency resolution (layer 3)."""
OFFLINE = 77
# Machine-specific pip settings (local wheel folders, caps) must not leak into the image's resolution.
_DROP_ENV = ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_REQUIREMENT", "PIP_NO_INDEX", "PIP_EXTRA_INDEX_URL",
             "PIP_CONFIG_FILE", "PIP_USER", "PIP_TARGET", "PIP_PREFIX")


def norm(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """`name==version` lines of a constraints file (comments and blank lines skipped)."""
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not m:
            raise ValueError(f"{path.name}: {raw!r} is not an exact name==version pin")
        pins[norm(m.group(1))] = m.group(2)
    return pins


def image_requirements() -> list[str]:
    """Layer 2's requirements: flash-attn's build tools, then lctrain's dependencies and its `gpu` extra."""
    build = [ln.split("#", 1)[0].strip() for ln in BUILD_REQUIREMENTS.read_text().splitlines()]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [r for r in build if r] + list(project["dependencies"]) + list(project["optional-dependencies"]["gpu"])


def cuda_problems(got: dict[str, str], torch_requires: list[str]) -> list[str]:
    """nvcc (the flash-attn build's compiler) must be the CUDA release of torch's runtime."""
    def minor(v: str | None) -> str | None:
        return ".".join(v.split(".")[:2]) if v else None

    nvcc, runtime = minor(got.get("nvidia-cuda-nvcc")), minor(got.get("nvidia-cuda-runtime"))
    pin = next((m.group(1) for r in torch_requires if (m := re.match(r"cuda-toolkit\[.*\]==([\d.]+)", r))), None)
    if nvcc is None:
        return ["no nvcc in the image's install set (docker/requirements-build.txt needs cuda-toolkit[nvcc])"]
    problems = []
    if nvcc != runtime:
        problems.append(f"nvcc is CUDA {nvcc} but torch's CUDA runtime is {runtime}: flash-attn would be compiled "
                        "for another CUDA than torch's")
    if pin and minor(pin) != nvcc:
        problems.append(f"torch requires cuda-toolkit {pin} but nvcc is CUDA {nvcc}")
    return problems


def dockerfile_problems(text: str | None = None) -> list[str]:
    """What the Dockerfile must say for the lock's CUDA to be the only one and flash-attn's build to be bounded."""
    if text is None:
        text = (ROOT / "docker/Dockerfile").read_text() + (ROOT / "docker/build_flash_attn.sh").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    problems = []
    if froms != [f"ubuntu:{UBUNTU}"]:
        problems.append(f"the image must start FROM ubuntu:{UBUNTU} (no CUDA of its own besides the lock's; Python "
                        f"{IMAGE_PYTHON}), not {froms}")
    for needle, why in (("FLASH_ATTENTION_FORCE_BUILD=TRUE", "flash-attn built from its sdist, never a guessed wheel"),
                        ("--no-build-isolation --no-deps flash-attn", "flash-attn built against the installed torch"),
                        ("build_flash_attn.sh", "the one flash-attn build (Dockerfile and make install-gpu)"),
                        ("MAX_JOBS=", "flash-attn's compile jobs bounded"),
                        ("NVCC_THREADS=", "nvcc threads per job bounded"),
                        ('FLASH_ATTN_CUDA_ARCHS="80;90"', "flash-attn for sm_80 / sm_90 only"),
                        ("libibverbs1", "NCCL's IB transport (verbs)"), ("ibverbs-providers", "the verbs drivers"),
                        ("rdma-core", "the RDMA user space"), ('".[gpu]"', "lctrain with its gpu extra (fla)"),
                        ("pip check", "a consistent install")):
        if needle not in text:
            problems.append(f"docker/Dockerfile lacks {needle!r} ({why})")
    return problems


def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env["PIP_CONFIG_FILE"] = os.devnull          # no global / user pip.conf
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def index_reachable(timeout_s: float = 15.0) -> str | None:
    """None if the package index answers, else the reason."""
    url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/") + "/pip/"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            resp.read(1)
    except Exception as err:  # noqa: BLE001 - any failure means: cannot check here
        return f"{url} unreachable: {err}"
    return None


def _dry_run(python: str, args: list[str], report: Path) -> dict:
    cmd = [sys.executable, "-m", "pip", "--python", python, "install", "--dry-run", "--quiet",
           "--report", str(report), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_pip_env(), timeout=900)
    if res.returncode:
        text = res.stdout + res.stderr
        if re.search(r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|timed out",
                     text):
            raise ConnectionError(text.strip()[-2000:])
        raise RuntimeError(f"pip could not resolve {' '.join(args)}:\n{text.strip()[-4000:]}")
    return json.loads(report.read_text())


def _interpreter(version: str = IMAGE_PYTHON) -> str:
    """A working python of `version` (PATH, then pyenv's versions), else this interpreter."""
    want = tuple(int(x) for x in version.split("."))
    candidates = [shutil.which(f"python{version}"), f"/usr/bin/python{version}"]
    candidates += sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))
    for cand in filter(None, candidates):
        try:
            out = subprocess.run([cand, "-c", "import sys, venv; print(*sys.version_info[:2])"], capture_output=True,
                                 text=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0 and tuple(map(int, out.stdout.split())) == want:
            return cand
    print(f"note: no working python{version} here; resolving for "
          f"{sys.version_info.major}.{sys.version_info.minor} instead", file=sys.stderr)
    return sys.executable


def _fake_installed_torch(venv_python: str, metadata: dict) -> None:
    """Record torch as installed in the venv (layer 1 done) with the real wheel's name, version and requirements."""
    purelib = subprocess.run([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    info = Path(purelib) / f"torch-{metadata['version']}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", "Name: torch", f"Version: {metadata['version']}"]
    lines += [f"Requires-Dist: {r}" for r in metadata.get("requires_dist") or []]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


def resolve(python: str | None = None, constraints: Path = CONSTRAINTS,
            keep_going: bool = False) -> tuple[dict[str, str], list[str]]:
    """Replay the image's layers; returns ({package: version} that pip would install, problems found).
    keep_going: resolve without the pins that this interpreter cannot install (only the torch pin is kept)."""
    pins = read_pins(constraints)
    if keep_going:
        constraints = Path(tempfile.mkdtemp(prefix="lctrain-floor-")) / "torch-only.txt"
        constraints.write_text(f"torch=={pins['torch']}\n")
    if "torch" not in pins:
        return {}, ["constraints.txt does not pin torch (the base layer)"]
    problems = []
    with tempfile.TemporaryDirectory(prefix="lctrain-resolve-") as tmp:
        tmp = Path(tmp)
        venv = tmp / "venv"
        subprocess.run([python or _interpreter(), "-m", "venv", "--without-pip", str(venv)], check=True)
        vpy = str(venv / "bin" / "python")
        # torch's own metadata only (its requirements are resolved in layer 2, as an installed package's are)
        base = _dry_run(vpy, ["--no-deps", f"torch=={pins['torch']}"], tmp / "base.json")
        (torch_meta,) = [i["metadata"] for i in base["install"]]
        got = {"torch": torch_meta["version"]}
        _fake_installed_torch(vpy, torch_meta)
        torch_requires = list(torch_meta.get("requires_dist") or [])
        rest = _dry_run(vpy, ["-c", str(constraints), *image_requirements()], tmp / "rest.json")
        for item in rest["install"]:
            name, version = norm(item["metadata"]["name"]), item["metadata"]["version"]
            if name == "torch":
                problems.append(f"installing lctrain would replace the base image's torch {pins['torch']} "
                                f"with {version}")
            got[name] = version
    for name, version in sorted(got.items()):
        if name not in pins:
            problems.append(f"{name}=={version} is installed but not pinned in {constraints.name}")
        elif pins[name] != version:
            problems.append(f"{name}: pip picks {version}, {constraints.name} pins {pins[name]}")
    for name in sorted(set(pins) - set(got) - NOT_RESOLVED):
        problems.append(f"{name}=={pins[name]} is pinned in {constraints.name} but nothing installs it")
    problems += cuda_problems(got, torch_requires) + dockerfile_problems()
    return got, problems


CUDA_BUILD = re.compile(r"(torch|nvidia-.*|cuda-.*)")
"""The packages of torch's CUDA build: what a CPU install (CI, `make install`) takes from elsewhere."""


def cpu_lock(torch: str, constraints: Path = CONSTRAINTS) -> str:
    """The lock for CPU installs, derived mechanically: every pin of `constraints` except torch's CUDA build
    (CUDA_BUILD), plus `torch` (e.g. "torch==2.13.0", the local CPU wheel) so that pip can never replace it."""
    if not re.fullmatch(r"torch==[\w.+]+", torch):
        raise ValueError(f"--torch must be an exact pin torch==VERSION, got {torch!r}")
    keep = [f"{n}=={v}" for n, v in sorted(read_pins(constraints).items()) if not CUDA_BUILD.fullmatch(n)]
    head = (f"# Derived from {constraints.name} by docker/resolve.py --cpu-lock (do not edit): the lock minus torch's "
            "CUDA build, torch held at the local CPU wheel.")
    return "\n".join([head, torch, *keep]) + "\n"


def write(got: dict[str, str]) -> None:
    """Rewrite the pins of constraints.txt (its leading comment block is kept)."""
    pins = read_pins()
    header = []
    for line in CONSTRAINTS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            header.append(line)
        else:
            break
    keep = {n: pins[n] for n in NOT_RESOLVED if n in pins}
    body = [f"{n}=={v}" for n, v in sorted({**got, **keep}.items())]
    CONSTRAINTS.write_text("\n".join(header + body) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--write", action="store_true", help="rewrite constraints.txt's pins from this resolution")
    p.add_argument("--constraints", type=Path, default=CONSTRAINTS, help="the lock to check (default: constraints.txt)")
    p.add_argument("--python", default=None, help=f"interpreter of the image's Python (default: python{IMAGE_PYTHON})")
    p.add_argument("--cpu-lock", type=Path, default=None, metavar="OUT",
                   help="write the CPU installs' lock (no network; see cpu_lock) to OUT and exit")
    p.add_argument("--torch", default="torch==2.13.0", help="with --cpu-lock: the torch pin of the CPU install")
    args = p.parse_args(argv)
    if args.cpu_lock is not None:
        text = cpu_lock(args.torch, args.constraints)
        args.cpu_lock.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.cpu_lock.with_name(args.cpu_lock.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.cpu_lock)
        return 0
    reason = index_reachable()
    if reason:
        print(f"SKIP: {reason}")
        return OFFLINE
    try:
        got, problems = resolve(args.python, args.constraints)
    except ConnectionError as err:
        print(f"SKIP: the package index failed during resolution: {err}")
        return OFFLINE
    except RuntimeError as err:
        print(err)
        return 1
    print(f"resolved {len(got)} packages for Python {IMAGE_PYTHON} on top of "
          f"torch=={read_pins(args.constraints)['torch']}; nvcc {got.get('nvidia-cuda-nvcc')}, CUDA runtime "
          f"{got.get('nvidia-cuda-runtime')}, fla-core {got.get('fla-core')}")
    if args.write:
        # Pins must install on the floor Python too (CPU installs, CI): resolve there and write those picks; the
        # image's resolution above then runs against them (a pin newer than the floor allows, e.g. one needing
        # Python 3.12, would otherwise land in the lock).
        try:
            floor, _ = resolve(_interpreter(FLOOR_PYTHON), args.constraints, keep_going=True)
        except (ConnectionError, RuntimeError) as err:
            print(err)
            return 1
        write({**got, **floor})
        print(f"wrote {CONSTRAINTS} (floor Python {FLOOR_PYTHON}'s picks where they differ); run the check again")
        return 0
    for line in problems:
        print(f"problem: {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
