"""The preemption notice (lctrain.checkpoint.preempt): signals become a flag only while a loop is armed, the flag is
visible from any thread, torchrun's 30 s kill caps the grace, and the schedulers' kill delays are checked."""
import os
import shlex
import signal
import threading
from pathlib import Path

import pytest
import yaml

from lctrain.checkpoint import preempt
from lctrain.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean():
    preempt.clear()
    yield
    preempt.clear()
    preempt.uninstall()


def test_signal_sets_the_flag_read_from_another_thread(clean):
    assert preempt.install()
    preempt.arm()
    try:
        seen = []
        reader = threading.Thread(target=lambda: seen.append(preempt.requested()))
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered to the main thread: the handler only sets the flag
        reader.start()
        reader.join()
        assert seen == [True] and preempt.reason() == "SIGUSR1"
    finally:
        preempt.disarm()


def test_unarmed_signal_does_what_it_did_before(clean):
    got = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    try:
        preempt.install()
        os.kill(os.getpid(), signal.SIGUSR1)  # no loop armed: the previous handler runs, no notice
        assert got == [signal.SIGUSR1] and not preempt.requested()
        preempt.uninstall()
        assert signal.getsignal(signal.SIGUSR1) is not preempt._handler
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_install_is_refused_off_the_main_thread(clean):
    out = []
    t = threading.Thread(target=lambda: out.append(preempt.install()))
    t.start()
    t.join()
    assert out == [False]  # as in a Ray actor method thread: RankWorker.__init__ installs it instead


def test_grace_under_torchrun_and_the_schedulers_kill_delay(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert preempt.effective_grace(120) == 120
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert preempt.effective_grace(120) == preempt.TORCHRUN_KILL_S - 2 and preempt.effective_grace(10) == 10
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"run.out_dir={tmp_path}", "launch.termination_grace_s=30"])
    (problem,) = preempt.check_preemption(cfg)
    assert "terminationGracePeriodSeconds" in problem and "135" in problem  # 120 + 15
    ok = load_config(ROOT / "configs/tiny.yaml", [f"run.out_dir={tmp_path}", "launch.termination_grace_s=135"])
    assert preempt.check_preemption(ok) == []


def test_recipes_give_the_save_its_time():
    """Every pod waits >= preempt_grace_s + 15 s, the RayJob tells --dry-run so, and SLURM signals early enough and
    requeues."""
    grace = load_config(ROOT / "configs/cluster-demo.yaml", []).train.preempt_grace_s
    for path in sorted((ROOT / "launch/k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc.get("kind") not in ("RayCluster", "RayJob"):
                continue
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                assert group["template"]["spec"]["terminationGracePeriodSeconds"] >= grace + preempt.TEARDOWN_MARGIN_S
            if doc["kind"] == "RayJob":
                argv = shlex.split(doc["spec"]["entrypoint"])
                (given,) = [a for a in argv if a.startswith("launch.termination_grace_s=")]
                assert float(given.split("=")[1]) == spec["headGroupSpec"]["template"]["spec"][
                    "terminationGracePeriodSeconds"]
    text = (ROOT / "launch/slurm/lctrain.sbatch").read_text()
    (lead,) = [int(line.split("@")[1]) for line in text.splitlines() if line.startswith("#SBATCH --signal=B:USR1@")]
    assert lead >= grace + preempt.TEARDOWN_MARGIN_S and "#SBATCH --requeue" in text
    assert f'"$STATUS" = {preempt.REQUEUE_EXIT}' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text


STUB_LCTRAIN = """#!/bin/bash
# lctrain launch stand-in: waits for a preemption notice (USR1), then exits as lctrain launch does (75)
trap 'echo "stub: USR1" >> "$STUB_LOG"; exit 75' USR1
touch "$STUB_READY"
for _ in $(seq 1 "${STUB_WAIT:-300}"); do sleep 0.1; done
exit "${STUB_RC:-0}"
"""


def _sbatch_tail(tmp_path: Path, **env: str):
    """The sbatch's last part (launch in the background, the USR1 trap, the requeue) with `on` running commands
    here and stand-ins for lctrain and scontrol; returns the running bash process."""
    import subprocess

    text = (ROOT / "launch/slurm/lctrain.sbatch").read_text()
    tail = text[text.index('LAUNCH_PID=""'):]
    script = tmp_path / "tail.sh"
    script.write_text('#!/bin/bash\nset -euo pipefail\non() { while [ "$1" != "--" ]; do shift; done; shift; "$@"; }\n'
                      'CONFIG=c.yaml NUM_NODES=2 GPUS_PER_NODE=8 ADDRESS=10.0.0.1:6379 HEAD=node1\n' + tail)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "lctrain").write_text(STUB_LCTRAIN)
    (stubs / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$STUB_LOG"\n')
    for f in stubs.iterdir():
        f.chmod(0o755)
    full = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "log"),
            "STUB_READY": str(tmp_path / "ready"), "SLURM_JOB_ID": "4242", **env}
    return subprocess.Popen(["bash", str(script)], env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.parametrize("case", ["preempted", "finished", "failed"])
def test_sbatch_passes_usr1_on_and_requeues(tmp_path, case):
    import time

    proc = _sbatch_tail(tmp_path, STUB_RC={"failed": "1"}.get(case, "0"),
                        STUB_WAIT="300" if case == "preempted" else "1")
    deadline = time.monotonic() + 20
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if case == "preempted":
        os.kill(proc.pid, signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@180` does: the batch shell only
    out, _ = proc.communicate(timeout=60)
    log = (tmp_path / "log").read_text() if (tmp_path / "log").exists() else ""
    if case == "preempted":
        assert proc.returncode == 0 and "stub: USR1" in log and "scontrol requeue 4242" in log, out + log
        assert "requeueing job 4242" in out
    else:
        assert "scontrol" not in log and proc.returncode == {"failed": 1}.get(case, 0), out + log
