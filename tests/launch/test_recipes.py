"""The recipes that cannot run here (SLURM, KubeRay, Docker) are linted and checked for the settings they promise."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
K8S = sorted((ROOT / "launch/k8s").glob("*.yaml"))


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in the venv (it is in the [dev] extra)")
    return str(path)


def test_sbatch_passes_shellcheck():
    script = ROOT / "launch/slurm/lctrain.sbatch"
    res = subprocess.run([_tool("shellcheck"), "--severity=style", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    text = script.read_text()
    assert "RAY_AUTH_MODE=token" in text and "--dashboard-host=127.0.0.1" in text
    assert 'lctrain launch "$CONFIG" "$@" --nodes "$NUM_NODES" --procs-per-node "$GPUS_PER_NODE"' in text


def test_dockerfile_passes_hadolint():
    dockerfile = ROOT / "docker/Dockerfile"
    res = subprocess.run([_tool("hadolint"), str(dockerfile)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    text = dockerfile.read_text()
    assert "flash-attn==" in text and "cuda" in text.split("FROM ", 1)[1].split("\n", 1)[0]
    # every COPY source exists, so the build context has what the image needs
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in shlex.split(line)[1:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} is missing"


@pytest.mark.parametrize("path", K8S, ids=[p.name for p in K8S])
def test_k8s_yaml_lints_and_matches_kuberay_schema(path):
    res = subprocess.run([_tool("yamllint"), "-s", "-d",
                          "{extends: default, rules: {line-length: {max: 120}, document-start: disable}}",
                          str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    assert doc["metadata"]["name"]
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for group in groups:
        # KubeRay's CRD types rayStartParams as map[string]string
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] and container["name"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"]
        mounts = {m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"] for v in group["template"]["spec"]["volumes"]}
        assert mounts <= volumes and "runs" in mounts
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    gpus = set()
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == group["rayStartParams"]["num-gpus"]
        gpus.add(int(limits["nvidia.com/gpu"]))
    if doc["kind"] == "RayJob":
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[:2] == ["lctrain", "launch"]
        nodes = sum(g["replicas"] for g in spec["workerGroupSpecs"])
        assert argv[argv.index("--nodes") + 1] == str(nodes)
        assert int(argv[argv.index("--procs-per-node") + 1]) in gpus
        assert doc["spec"]["submissionMode"] == "SidecarMode"
