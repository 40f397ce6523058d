"""`lctrain submit` / `lctrain job` against a real Ray head on this machine (`ray start --head`), token auth on.

The head runs with its own temp dir as HOME; at the end every process with that HOME is stopped by pid
(never `ray stop`, which would stop every Ray instance of this user).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from lctrain.launch import jobs
from lctrain.launch.cli import job_main, submit_main

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_find_auth_token_follows_rays_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    missing = jobs.find_auth_token()
    assert missing.token is None and str(tmp_path / ".ray/auth_token") in missing.source
    assert "RAY_AUTH_TOKEN" in jobs.missing_token_help(missing)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray/auth_token").write_text("home-token\n")
    assert jobs.find_auth_token().token == "home-token"
    (tmp_path / "t").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert jobs.find_auth_token().token == "path-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert jobs.find_auth_token() == jobs.AuthToken("env-token", "$RAY_AUTH_TOKEN")


@pytest.mark.slow
def test_job_ships_the_package_as_built(tmp_path):
    """An editable install ships the lctrain/ of a wheel built from the checkout: kernels, launch and the recipes
    inside, importable from anywhere without the checkout; the working directory holds only config and includes."""
    pkg = jobs.package_for_job(tmp_path / "p")
    assert pkg.name == "lctrain" and not str(pkg).startswith(str(ROOT))
    for rel in ("cli.py", "launch/cli.py", "kernels/__init__.py", "launch/slurm/lctrain.sbatch",
                "launch/k8s/rayjob.yaml"):
        assert (pkg / rel).is_file(), rel
    assert not (pkg / "tests").exists() and not (pkg / "configs").exists()
    code = "import lctrain.launch.supervisor as s, lctrain.kernels as k; print(s.__file__); print(k.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(pkg.parent)}).stdout.split()
    assert all(p.startswith(str(pkg)) for p in out), out
    fake = str(Path(__file__).parent / "fake_trainer.py")
    work = jobs.stage_workdir(ROOT / "configs/tiny.yaml", tmp_path / "w", [fake])
    assert sorted(p.name for p in work.iterdir()) == ["fake_trainer.py", "job_config.yaml"]
    with pytest.raises(ValueError, match="does not exist"):
        jobs.stage_workdir(ROOT / "configs/tiny.yaml", tmp_path / "w2", ["no/such/file"])


def test_job_address_errors(capsys):
    ok = ["configs/tiny.yaml", "run.out_dir=/shared/runs/tiny"]
    assert submit_main([*ok, "--address", "127.0.0.1:8265"]) == 1
    assert "must be the job server's URL" in capsys.readouterr().err
    assert submit_main([*ok, "--address", "http://127.0.0.1:9"]) == 1
    assert "cannot reach the Ray job server at http://127.0.0.1:9" in capsys.readouterr().err


PROBE = """import lctrain, lctrain.kernels
from fake_trainer import run as _run


def run(cfg, resume="auto"):
    import os

    print("fallback", os.environ.get("LCTRAIN_ALLOW_KERNEL_FALLBACK"), flush=True)
    print("lctrain from", lctrain.__file__, "kernels from", lctrain.kernels.__file__, flush=True)
    return _run(cfg, resume)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_processes_with_home(home: str) -> None:
    """Stop the head's processes: `ray start` ran with HOME=home, which all of them inherit."""
    procs = {}
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get("HOME") == home:
                # agents retitle themselves (setproctitle hides their environment): take children too
                for q in [p, *p.children(recursive=True)]:
                    procs[q.pid] = q
        except psutil.Error:
            pass
    procs = list(procs.values())
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def head():
    """A Ray head with token auth and its job server on 127.0.0.1; yields (url, token)."""
    temp = tempfile.mkdtemp(prefix="lcr", dir="/tmp")
    token = secrets.token_hex(16)
    dash = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "HOME": temp,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        for attempt in (1, 2):
            # Every port is picked free, so another Ray instance on this machine cannot collide with this one
            # (a port taken between the pick and Ray's bind fails the start: then once more with new ports).
            dash = _free_port()
            ports = [f"--{name}={_free_port()}" for name in (
                "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                "ray-client-server-port", "metrics-export-port", "node-manager-port", "object-manager-port")]
            res = subprocess.run([str(BIN / "ray"), "start", "--head", *ports, "--num-cpus", "1",
                                  "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--temp-dir", temp,
                                  "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
            if res.returncode == 0:
                break
            _stop_processes_with_home(temp)
            if attempt == 2:
                raise RuntimeError(f"ray start --head failed twice:\n{(res.stdout + res.stderr)[-3000:]}")
        yield f"http://127.0.0.1:{dash}", token
    finally:
        _stop_processes_with_home(temp)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_submit_runs_a_job_to_completion(head, tmp_path, monkeypatch, capsys):
    url, token = head
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "probe_trainer.py").write_text(PROBE)
    args = ["configs/tiny.yaml", f"run.out_dir={tmp_path / 'run'}", "train.steps=2", "checkpoint.every=0",
            "launch.entrypoint=probe_trainer:run", "--include", str(Path(__file__).parent / "fake_trainer.py"),
            "--include", str(tmp_path / "probe_trainer.py"), "--address", url, "--nodes", "1", "--procs-per-node", "1"]
    # without the token the job server refuses, and the error says where the token was looked for
    assert submit_main(args) == 1
    err = capsys.readouterr().err
    assert "requires token authentication" in err and "no Ray authentication token found" in err

    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-" + token)
    assert submit_main(args) == 1
    assert "rejected the token" in capsys.readouterr().err

    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.setenv("LCTRAIN_ALLOW_KERNEL_FALLBACK", "1")     # lctrain's switches reach the ranks
    assert submit_main(args + ["--wait", "--timeout", "240"]) == 0
    out = capsys.readouterr().out
    job_id = out.split()[0]
    assert f"job {job_id}: SUCCEEDED" in out and "[lctrain launch] done: step 2" in out
    assert (tmp_path / "run/metrics.jsonl").read_text().count("\n") == 2

    assert job_main(["status", job_id, "--address", url]) == 0
    assert f"{job_id}: SUCCEEDED" in capsys.readouterr().out
    assert job_main(["logs", job_id, "--address", url]) == 0
    logs = capsys.readouterr().out
    assert "gang of 1 ranks on 1 node(s)" in logs
    assert "fallback 1" in logs
    # the rank imported the shipped package (Ray's copy of the built wheel), not the checkout
    (line,) = [ln for ln in logs.splitlines() if "lctrain from" in ln]
    shipped, kernels = line.split("lctrain from ", 1)[1].split(" kernels from ")
    assert not shipped.startswith(str(ROOT)) and "py_modules" in shipped
    assert Path(kernels).parent.parent == Path(shipped).parent
    assert job_main(["stop", job_id, "--address", url]) == 0
    assert "already finished" in capsys.readouterr().out
    assert job_main(["status", "no-such-job", "--address", url]) == 1
    assert "no-such-job" in capsys.readouterr().err
