"""Ray Job Submission: send `lctrain launch` to a cluster's job server, and query or stop the job.

The job ships the lctrain package this process runs, built the way it was installed: a wheel install's package
directory (which already holds lctrain.kernels and lctrain.launch) as it is; an editable install or a checkout as
the `lctrain/` of a wheel built from that tree (`pip wheel --no-deps`, pyproject's one packaging path). It goes to
Ray as a `py_modules` entry, so the job's driver and every rank actor import that package (ahead of any lctrain
installed on the nodes). The working directory holds only the run's config as `job_config.yaml` and the
`--include` paths; the job runs `python -m lctrain launch job_config.yaml ...` on the head node. Ray's token
authentication stays on: the token is looked up as Ray does (RAY_AUTH_TOKEN, then the file named by
RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token) and sent as a Bearer header; a missing or rejected token is reported
with where it was looked for.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient


class JobError(RuntimeError):
    """The job server cannot be reached, refuses the request, or the job failed."""


@dataclass
class AuthToken:
    """A Ray authentication token and where it came from."""

    token: str | None
    source: str
    """Where it was found, or the places that were searched when it was not."""


def find_auth_token() -> AuthToken:
    """Look up the cluster token as Ray does: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return AuthToken(os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN")
    searched = ["$RAY_AUTH_TOKEN (unset)"]
    paths = []
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        paths.append(Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser())
    paths.append(Path.home() / ".ray" / "auth_token")
    for path in paths:
        if path.is_file() and path.read_text().strip():
            return AuthToken(path.read_text().strip(), str(path))
        searched.append(f"{path} (missing or empty)")
    return AuthToken(None, ", ".join(searched))


def missing_token_help(token: AuthToken) -> str:
    """What to do when the job server wants a token we do not have."""
    return (f"no Ray authentication token found (looked in {token.source}). Copy the cluster's token from the "
            "head node (`ray get-auth-token` there) and export RAY_AUTH_TOKEN=<token>, or write it to "
            "~/.ray/auth_token (or a file named by RAY_AUTH_TOKEN_PATH)")


def connect(address: str) -> JobSubmissionClient:
    """A JobSubmissionClient for the job server at `address` (http://HEAD:8265), authenticated with the token.

    Raises:
        JobError: bad address, server unreachable, or authentication refused (with what is missing).
    """
    if not address.startswith(("http://", "https://")):
        raise JobError(f"--address must be the job server's URL, e.g. http://HEAD:8265, got {address!r}")
    token = find_auth_token()
    headers = {}
    if token.token and os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled":
        headers["Authorization"] = f"Bearer {token.token}"
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as err:
        text = " ".join(str(err).split())
        if "401" in text or "Authentication required" in text or "Unauthorized" in text:
            raise JobError(f"the job server at {address} requires token authentication: "
                           f"{missing_token_help(token)}") from None
        if "403" in text or "Forbidden" in text or "invalid" in text.lower() and "token" in text.lower():
            raise JobError(f"the job server at {address} rejected the token from {token.source}; "
                           "use the token of this cluster (`ray get-auth-token` on its head node)") from None
        raise JobError(f"cannot reach the Ray job server at {address}: {text}") from None


def _copy_tree(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info"))


def build_wheel(source: Path, dest: Path) -> Path:
    """Build lctrain's wheel from a source tree (copied first, so the tree gets no build/ or egg-info); returns it.

    Uses this environment's setuptools without build isolation (offline); without setuptools here, pip builds
    in an isolated environment instead (which needs the package index).
    """
    src = dest / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(source / name, src / name)
    for name in ("lctrain", "kernels", "launch"):
        _copy_tree(source / name, src / name)
    out = dest / "wheel"
    base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out)]
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    res = subprocess.run([*base, *isolation, str(src)], capture_output=True, text=True)
    if res.returncode:
        raise JobError(f"building lctrain's wheel from {source} failed:\n{(res.stdout + res.stderr).strip()[-3000:]}")
    (wheel,) = out.glob("lctrain-*.whl")
    return wheel


def package_for_job(dest: str | Path) -> Path:
    """The lctrain package this process imports, as one directory (named lctrain) to ship with a job."""
    dest = Path(dest)
    spec = importlib.util.find_spec("lctrain")
    pkg = Path(list(spec.submodule_search_locations)[0])
    if (pkg / "kernels" / "__init__.py").is_file() and (pkg / "launch" / "__init__.py").is_file():
        return pkg                                    # a wheel install: the package as installed
    source = pkg.parent
    if not (source / "pyproject.toml").is_file():
        raise JobError(f"lctrain at {pkg} is neither a wheel install nor a checkout with pyproject.toml")
    wheel = build_wheel(source, dest / "build")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(dest / "wheel", [n for n in zf.namelist() if n.startswith("lctrain/")])
    return dest / "wheel" / "lctrain"


def stage_workdir(config_path: str | Path, dest: str | Path, include: list[str] | None = None) -> Path:
    """The job's working directory under `dest`: the run config as job_config.yaml and the `include` paths."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_path, dest / "job_config.yaml")
    for item in include or []:
        src = Path(item)
        if src.is_dir():
            _copy_tree(src, dest / src.name)
        elif src.is_file():
            shutil.copyfile(src, dest / src.name)
        else:
            raise ValueError(f"--include {item!r} does not exist")
    return dest


#: lctrain's run-time switches (lctrain.ops): set where `lctrain submit` runs, they reach the job and its ranks.
FORWARDED_ENV = ("LCTRAIN_ALLOW_KERNEL_FALLBACK", "LCTRAIN_ALLOW_UNVALIDATED_GPU")


def forwarded_env() -> dict[str, str]:
    """The FORWARDED_ENV variables set in this process."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def submit(client: JobSubmissionClient, config_path: str, overrides: list[str], nodes: int,
           procs_per_node: int, include: list[str] | None = None, submission_id: str | None = None,
           agent_wait_s: float = 60.0) -> str:
    """Submit `lctrain launch` of `config_path` as a Ray job; returns the job id.

    Args:
        client: from `connect`.
        config_path: run config (YAML) on this machine.
        overrides: dotted key=value overrides passed to `lctrain launch`.
        nodes: --nodes of the launch.
        procs_per_node: --procs-per-node of the launch.
        include: extra files/directories shipped in the job's working directory.
        submission_id: the job id to use (Ray makes one when None).
        agent_wait_s: how long to retry while the head's job agent is not up yet.
    """
    if not Path(config_path).is_file():
        raise ValueError(f"config file {config_path!r} does not exist")
    argv = ["python", "-m", "lctrain", "launch", "job_config.yaml", *overrides,
            "--nodes", str(nodes), "--procs-per-node", str(procs_per_node)]
    with tempfile.TemporaryDirectory(prefix="lctrain-job-") as tmp:
        workdir = stage_workdir(config_path, Path(tmp) / "workdir", include)
        package = package_for_job(Path(tmp) / "package")
        deadline = time.monotonic() + agent_wait_s
        while True:
            try:
                return client.submit_job(entrypoint=shlex.join(argv), submission_id=submission_id,
                                         runtime_env={"working_dir": str(workdir), "py_modules": [str(package)],
                                                      "env_vars": forwarded_env()},
                                         metadata={"lctrain_config": Path(config_path).name})
            except Exception as err:
                text = " ".join(str(err).split())
                # A head that has just started answers 500 until its job agent is up.
                if "No available agent" not in text or time.monotonic() > deadline:
                    raise JobError(f"submitting the job failed: {text}") from None
                time.sleep(2.0)


def wait(client: JobSubmissionClient, job_id: str, timeout_s: float, poll_s: float = 1.0) -> JobStatus:
    """Poll until the job reaches a terminal status (or `timeout_s` passes); return the last status."""
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(poll_s)
        status = client.get_job_status(job_id)
    return status
