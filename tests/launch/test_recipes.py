"""The recipes that cannot run here (SLURM, KubeRay, Docker) are linted, checked for the settings they promise, and
every example command in them and in the READMEs is run at its stated scale with --dry-run (the pre-reservation
check) and passes. The SLURM script itself runs under stand-in `srun`/`scontrol` commands up to that check."""
from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from lctrain.launch.cli import launch_main, submit_main

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
K8S = sorted((ROOT / "launch/k8s").glob("*.yaml"))
SBATCH = ROOT / "launch/slurm/lctrain.sbatch"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"lctrain:{VERSION}"
sys.path.insert(0, str(ROOT / "docker"))
import resolve  # noqa: E402  (docker/resolve.py: the lock's reader)

sys.path.pop(0)
PINS = resolve.read_pins()


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in the venv (it is in the [dev] extra)")
    return str(path)


# examples
DOCS = ["README.md", "launch/README.md", "docker/README.md", "docs/cluster.md"]
COMMAND = re.compile(r"^(?:\$ )?((?:lctrain (?:train|launch|submit) |torchrun ).*)$")


def example_commands(rel: str) -> list[str]:
    """The lctrain train/launch/submit and torchrun commands of a document's code (indented or fenced) lines;
    synopsis lines (CONFIG, [options], a|b) are usage, not examples."""
    out, fenced = [], False
    for raw in (ROOT / rel).read_text().splitlines():
        if raw.strip().startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or raw.startswith("    ")):
            continue
        m = COMMAND.match(raw.strip())
        if not m:
            continue
        cmd = re.split(r"\s+# ", m.group(1), maxsplit=1)[0].strip()
        if "CONFIG" in cmd or "[" in cmd or "|" in cmd:
            continue
        out.append(cmd)
    return out


def dry_run(cmd: str, capsys) -> tuple[int, str]:
    """Run an example command's pre-reservation check in this process; returns (exit code, output)."""
    from lctrain.train.cli import main as train_main

    argv = shlex.split(cmd)
    argv = [str(ROOT / a) if a.startswith("configs/") else a for a in argv]
    argv = [a.replace("/opt/lctrain/", f"{ROOT}/") for a in argv]
    if argv[0] == "torchrun":
        per_node = int(argv[argv.index("--nproc-per-node") + 1])
        nodes = int(argv[argv.index("--nnodes") + 1]) if "--nnodes" in argv else 1
        rest = argv[argv.index("lctrain") + 2:]
        rc = train_main([*rest, "--dry-run", "--world-size", str(per_node * nodes), "--procs-per-node", str(per_node)])
    elif argv[1] == "train":
        rc = train_main([a for a in argv[2:] if a != "--dry-run"] + ["--dry-run"])
    elif argv[1] == "launch":
        rc = launch_main([a for a in argv[2:] if a != "--dry-run"] + ["--dry-run"])
    else:
        rc = submit_main([a for a in argv[2:] if a != "--dry-run"] + ["--dry-run"])
    got = capsys.readouterr()
    return rc, got.out + got.err


def test_every_document_has_its_examples_found():
    found = {rel: example_commands(rel) for rel in DOCS}
    assert len(found["README.md"]) >= 4 and found["docs/cluster.md"] and found["docker/README.md"], found


@pytest.mark.parametrize("rel", DOCS)
def test_document_examples_pass_their_dry_run(rel, capsys):
    for cmd in example_commands(rel):
        rc, out = dry_run(cmd, capsys)
        assert rc == 0, f"{rel}: `{cmd}` fails its pre-reservation check:\n{out}"


def test_the_old_examples_would_fail_in_seconds(capsys):
    """What the issue found: demo.yaml on 2 x 8 GPUs (batch 64 vs micro-batch 16 x DP 8) and a relative out_dir."""
    rc, out = dry_run("lctrain launch configs/demo.yaml --nodes 2 --procs-per-node 8 --address 127.0.0.1:9", capsys)
    assert rc == 2 and "16 x 8 = 128" in out and "is relative" in out
    rc, out = dry_run("lctrain submit configs/tiny.yaml --address http://127.0.0.1:9", capsys)
    assert rc == 2 and "a Ray job needs an absolute path" in out


# SLURM
def test_sbatch_passes_shellcheck():
    res = subprocess.run([_tool("shellcheck"), "--severity=style", str(SBATCH)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    text = SBATCH.read_text()
    assert "RAY_AUTH_MODE=token" in text and "--dashboard-host=127.0.0.1" in text
    assert "hostname --ip-address" not in text and "hostname -i" not in text
    assert "--container-image=" in text and "--container-name=" in text and "apptainer exec --nv" in text
    assert 'lctrain launch "$CONFIG" "$@" --nodes "$NUM_NODES" --procs-per-node "$GPUS_PER_NODE"' in text


STUBS = {
    # srun: log the arguments, drop srun's options (and -w's value), run the command here
    "srun": '''echo "srun $*" >> "$STUB_LOG"
while [ "$#" -gt 0 ]; do case "$1" in -w|--nodelist) shift 2;; -*) shift;; *) break;; esac; done
exec "$@"''',
    "scontrol": 'for i in $(seq 1 "$SLURM_JOB_NUM_NODES"); do echo "node$i"; done',
    "apptainer": '''echo "apptainer $*" >> "$STUB_LOG"
shift; while [ "$#" -gt 0 ]; do case "$1" in --bind|--pwd) shift 2;; -*) shift;; *) break;; esac; done
shift; exec "$@"''',
    # the head's name resolves to loopback first (Debian's 127.0.1.1) and then to its cluster address
    "getent": 'printf "127.0.1.1 STREAM node1\\n${STUB_HEAD_IP:-} STREAM node1\\n" | awk "NF == 3"',
    "hostname": 'if [ "${1:-}" = -I ]; then echo "127.0.1.1"; else echo node1; fi',
    "ray": 'echo "ray $*" >> "$STUB_LOG"',
}


def _stub_env(tmp_path: Path, **env: str) -> dict[str, str]:
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (stubs / name).write_text("#!/bin/bash\n" + body + "\n")
        (stubs / name).chmod((stubs / name).stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{stubs}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
            "STUB_LOG": str(tmp_path / "calls.log"), "LCTRAIN_DRY_RUN": "1", **env}


def _sbatch_example() -> tuple[dict[str, str], list[str]]:
    """The header's `sbatch --nodes=N lctrain.sbatch ARGS` example as SLURM would start it."""
    (line,) = [ln for ln in SBATCH.read_text().splitlines() if re.match(r"#\s+sbatch ", ln)]
    argv = shlex.split(line.lstrip("#"))
    nodes = next(a.split("=", 1)[1] for a in argv if a.startswith("--nodes="))
    gpus = re.search(r"#SBATCH --gpus-per-node=(\d+)", SBATCH.read_text()).group(1)
    args = argv[argv.index("launch/slurm/lctrain.sbatch") + 1:]
    return {"SLURM_JOB_NUM_NODES": nodes, "SLURM_JOB_NODELIST": f"node[1-{nodes}]", "SLURM_GPUS_ON_NODE": gpus,
            "SLURM_CPUS_PER_TASK": "64", "SLURM_JOB_ID": "4242"}, args


@pytest.mark.slow
def test_sbatch_example_runs_its_check_at_its_scale(tmp_path):
    slurm, args = _sbatch_example()
    # pyxis: every srun carries the image; the head address skips the loopback answer
    env = _stub_env(tmp_path, **slurm, LCTRAIN_CONTAINER="pyxis", LCTRAIN_IMAGE=IMAGE, STUB_HEAD_IP="10.11.12.13")
    res = subprocess.run(["bash", str(SBATCH), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    world = int(slurm["SLURM_JOB_NUM_NODES"]) * int(slurm["SLURM_GPUS_ON_NODE"])
    assert f"preflight OK: world={world} ({slurm['SLURM_JOB_NUM_NODES']} node(s) x 8)" in res.stdout
    assert "Ray head: node1 at 10.11.12.13:6379" in res.stdout
    calls = (tmp_path / "calls.log").read_text()
    assert f"--container-image={IMAGE}" in calls and "ray " not in calls      # nothing started in a dry run
    assert f"--container-name=lctrain-{slurm['SLURM_JOB_ID']}" in calls       # one container per node, reused
    out_dir = next(a.split("=", 1)[1] for a in args if a.startswith("run.out_dir="))
    assert f"run directory: {out_dir}; mounts: {ROOT}:{ROOT},{out_dir}:{out_dir}" in res.stdout
    assert "NCCL: NCCL_SOCKET_IFNAME=^lo,docker NCCL_IB_HCA=(all) NCCL_IB_GID_INDEX=(auto)" in res.stdout
    assert "NCCL between nodes:" in res.stdout  # the check says which transport NCCL will use
    # apptainer, the old demo config: the job stops at the check with the reason, before Ray
    (tmp_path / "calls.log").unlink()
    env = _stub_env(tmp_path, **slurm, LCTRAIN_CONTAINER="apptainer", LCTRAIN_IMAGE="/img/lctrain.sif",
                    STUB_HEAD_IP="10.11.12.13", LCTRAIN_DRY_RUN="0")
    res = subprocess.run(["bash", str(SBATCH), "configs/demo.yaml"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "is not divisible by train.micro_batch_size x DP" in res.stderr
    calls = (tmp_path / "calls.log").read_text()
    assert "apptainer exec --nv" in calls and "ray " not in calls


def test_sbatch_refuses_a_loopback_head_address(tmp_path):
    slurm, args = _sbatch_example()
    res = subprocess.run(["bash", str(SBATCH), *args], cwd=ROOT, env=_stub_env(tmp_path, **slurm),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "could not find a non-loopback address of node1" in res.stderr
    res = subprocess.run(["bash", str(SBATCH), *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=_stub_env(tmp_path, **slurm, LCTRAIN_CONTAINER="podman"))
    assert res.returncode == 2 and "LCTRAIN_CONTAINER must be none, pyxis or apptainer" in res.stderr


# image
def test_dockerfile_passes_hadolint_and_installs_from_the_lock():
    dockerfile = ROOT / "docker/Dockerfile"
    for tool, path in (("hadolint", dockerfile), ("shellcheck", ROOT / "docker/build_flash_attn.sh")):
        res = subprocess.run([_tool(tool), str(path)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    text = dockerfile.read_text()
    script = (ROOT / "docker/build_flash_attn.sh").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base == f"ubuntu:{resolve.UBUNTU}" and resolve.IMAGE_PYTHON == "3.12"  # the resolution's Python is the image's
    assert resolve.dockerfile_problems() == []
    installs = re.findall(r"pip install ([^\\&\n]*)", text)
    assert installs and all("-c constraints.txt" in i for i in installs), installs
    assert re.search(r'pip install -c "\$CONSTRAINTS" --no-build-isolation --no-deps flash-attn', script)
    assert "pip check" in text
    # every COPY source exists, so the build context has what the image needs
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in shlex.split(line)[1:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} is missing"
    ignored = (ROOT / "docker/Dockerfile.dockerignore").read_text().split()
    assert "constraints.txt" not in ignored and "docker" not in ignored


def test_lock_pins_what_the_issue_names():
    assert PINS["torch"] and PINS["flash-attn"] and PINS["ray"] == "2.60.0" and PINS["fla-core"].startswith("0.6.")
    assert PINS["nvidia-cuda-nvcc"].split(".")[:2] == PINS["nvidia-cuda-runtime"].split(".")[:2]
    assert PINS["megatron-core"].startswith("0.16.") and PINS["deepspeed"] == "0.19.8" and PINS["triton"] == "3.9.0"
    with pytest.raises(ValueError, match="not an exact name==version pin"):
        bad = ROOT / "docker" / "no-such.txt"
        try:
            bad.write_text("torch>=2.6\n")
            resolve.read_pins(bad)
        finally:
            bad.unlink()


# KubeRay
CRD = {kind: json.loads((ROOT / f"tests/launch/kuberay_crd/ray.io_{kind.lower()}s.v1.schema.json").read_text())
       for kind in ("RayCluster", "RayJob")}


def strict(schema):
    """The CRD schema as `kubectl apply` validates it (strict field validation): unknown fields are errors."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_errors(doc: dict) -> list[str]:
    """Validation errors of a RayCluster / RayJob against KubeRay's own CRD schema (tests/launch/kuberay_crd)."""
    import jsonschema

    validator = jsonschema.Draft7Validator(strict(CRD[doc["kind"]]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def _k8s_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", K8S, ids=[p.name for p in K8S])
def test_k8s_yaml_lints_and_validates_against_kuberays_crd(path, capsys, monkeypatch):
    res = subprocess.run([_tool("yamllint"), "-s", "-d",
                          "{extends: default, rules: {line-length: {max: 120}, document-start: disable}}",
                          str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    (doc,) = _k8s_docs(path)
    if doc["kind"] == "ConfigMap":  # NCCL's settings: strings, NCCL's variables only
        assert doc["metadata"]["name"] == "lctrain-nccl" and doc["data"]["NCCL_SOCKET_IFNAME"]
        assert all(k.startswith("NCCL_") and isinstance(v, str) and v for k, v in doc["data"].items())
        return
    assert doc["apiVersion"] == "ray.io/v1" and crd_errors(doc) == []
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == PINS["ray"], "KubeRay's rayVersion must be the image's Ray (constraints.txt)"
    assert spec["authOptions"] == {"mode": "token"}  # KubeRay makes and injects the token (>= 1.5.1, Ray >= 2.52)
    for group in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        ctx = pod["securityContext"]
        assert ctx["fsGroup"] == ctx["runAsGroup"] == 1000 and ctx["runAsUser"] == 1000 and ctx["runAsNonRoot"]
        (container,) = pod["containers"]
        assert container["image"] == IMAGE, "pinned image tag = lctrain's version"
        assert not any("RAY_AUTH" in e["name"] for e in container.get("env", [])), "no hand-made token"
        (check,) = pod["initContainers"]  # /runs writable (NFS ignores fsGroup), checked before Ray starts
        assert check["image"] == IMAGE and {"name": "runs", "mountPath": "/runs"} in check["volumeMounts"]
        assert "touch" in check["args"][0] and "NFS volumes ignore fsGroup" in check["args"][0]
        assert {"name": "runs", "mountPath": "/runs"} in container["volumeMounts"]
        res_ = container["resources"]
        assert res_["requests"] == res_["limits"]
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == group["rayStartParams"]["num-gpus"]
        assert {"configMapRef": {"name": "lctrain-nccl", "optional": True}} in container["envFrom"]
    if doc["kind"] == "RayJob":
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[:2] == ["lctrain", "launch"]
        nodes = sum(g["replicas"] for g in spec["workerGroupSpecs"])
        gpus = {int(g["rayStartParams"]["num-gpus"]) for g in spec["workerGroupSpecs"]}
        assert argv[argv.index("--nodes") + 1] == str(nodes) and int(argv[argv.index("--procs-per-node") + 1]) in gpus
        # the entrypoint at its scale, as the head's job driver runs it (RAY_ADDRESS set: a real multi-node run)
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
        rc, out = dry_run(doc["spec"]["entrypoint"], capsys)
        assert rc == 0 and f"world={nodes * max(gpus)} ({nodes} node(s)" in out, out


def test_crd_validation_catches_what_the_api_server_rejects():
    (doc,) = _k8s_docs(ROOT / "launch/k8s/raycluster.yaml")
    assert crd_errors(doc) == []
    spec = doc["spec"]
    mutations = [
        ("authOption", lambda s: s.update(authOption=s.pop("authOptions"))),  # a typo'd field
        ("'tokens' is not one of", lambda s: s["authOptions"].update(mode="tokens")),
        ("is not of type 'string'", lambda s: s["workerGroupSpecs"][0]["rayStartParams"].update({"num-gpus": 8})),
        ("'groupName' is a required property", lambda s: s["workerGroupSpecs"][0].pop("groupName")),
        ("'containers' is a required property", lambda s: s["headGroupSpec"]["template"]["spec"].pop("containers")),
    ]
    for want, mutate in mutations:
        bad = json.loads(json.dumps(doc))
        mutate(bad["spec"])
        errors = crd_errors(bad)
        assert any(want in e for e in errors), (want, errors)
    assert spec  # the original is untouched


def test_cluster_doc_says_how_every_block_is_checked():
    """docs/cluster.md: each command block opens with how it is checked (a test that exists) or why it needs a
    real cluster."""
    text = (ROOT / "docs/cluster.md").read_text()
    blocks = re.findall(r"```\n(.*?)```", text, re.S)
    assert len(blocks) >= 8
    for block in blocks:
        first = block.splitlines()[0]
        assert first.startswith(("# checked by ", "# needs a real cluster")), first
        for ref in re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", block):
            path, name = ROOT / ref[0], ref[1]
            assert path.is_file(), ref
            if name:
                assert f"def {name}(" in path.read_text(), ref
    # the commands the doc walks through are the recipes' own
    assert "sbatch --nodes=4 launch/slurm/lctrain.sbatch configs/cluster-demo.yaml" in text
    assert "kubectl apply -f launch/k8s/rayjob.yaml" in text and "python docker/resolve.py" in text
