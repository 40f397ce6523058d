"""Ray Job Submission: send `lctrain launch` to a cluster's job server, and query or stop the job.

The job's runtime environment is a staged copy of the project: the lctrain package assembled as it is
installed (launch/ and kernels/ inside it), configs/, and the run's config as `job_config.yaml`; the job
runs `python -m lctrain launch job_config.yaml ...` on the head node, and its rank actors inherit the
same working directory. Ray's token authentication stays on: the token is looked up as Ray does
(RAY_AUTH_TOKEN, then the file named by RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token) and sent as a Bearer
header; a missing or rejected token is reported with where it was looked for.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import tempfile
import time
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


def _package_dirs() -> dict[str, Path]:
    """Where lctrain and its mapped subpackages live in this installation."""
    dirs = {}
    for name in ("lctrain", "lctrain.launch", "lctrain.kernels"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs[name] = Path(list(spec.submodule_search_locations)[0])
    return dirs


def stage_bundle(config_path: str | Path, dest: str | Path, include: list[str] | None = None) -> Path:
    """Assemble the job's working directory under `dest` (see the module docstring); returns it.

    Args:
        config_path: the run config, copied to `job_config.yaml`.
        dest: an empty or missing directory.
        include: extra files or directories copied to the top of the bundle (importable by the job).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    dirs = _package_dirs()
    pkg = dest / "lctrain"
    shutil.copytree(dirs["lctrain"], pkg, ignore=ignore)
    for name, src in dirs.items():
        sub = name.split(".", 1)[1] if "." in name else None
        if sub and not (pkg / sub).exists():
            shutil.copytree(src, pkg / sub, ignore=ignore)
    configs = dirs["lctrain"].parent / "configs"
    if configs.is_dir():
        shutil.copytree(configs, dest / "configs", ignore=ignore)
    shutil.copyfile(config_path, dest / "job_config.yaml")
    for item in include or []:
        src = Path(item)
        if src.is_dir():
            shutil.copytree(src, dest / src.name, ignore=ignore)
        elif src.is_file():
            shutil.copyfile(src, dest / src.name)
        else:
            raise ValueError(f"--include {item!r} does not exist")
    return dest


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
        bundle = stage_bundle(config_path, Path(tmp) / "bundle", include)
        deadline = time.monotonic() + agent_wait_s
        while True:
            try:
                return client.submit_job(entrypoint=shlex.join(argv), submission_id=submission_id,
                                         runtime_env={"working_dir": str(bundle)},
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
