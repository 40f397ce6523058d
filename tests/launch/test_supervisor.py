"""`lctrain launch` on a simulated 2-node x 2-CPU Ray cluster: placement, env, restarts, failures, real training.

One cluster (ray.cluster_utils.Cluster: a 2-CPU head plus one 2-CPU node) is shared by the module; every
launch connects to it as a driver and disconnects at the end. The fake trainer (fake_trainer.py) checks the
launcher's mechanics quickly; the real trainer (configs/tiny.yaml) checks that a 2 x 2 launch trains exactly
like `lctrain train --nproc 4` and that a killed rank or a lost node resumes to the same final loss.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from lctrain.config import load_config
from lctrain.launch.cli import launch_main
from lctrain.launch.placement import reserve_gang
from lctrain.launch.supervisor import launch
from tests.launch import fake_trainer

ROOT = Path(__file__).resolve().parents[2]
FAKE = "launch.entrypoint=tests.launch.fake_trainer:"


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        c.add_node(num_cpus=2)
        c.wait_for_nodes()
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


def _fake_args(out: Path, fn: str, *extra: str) -> list[str]:
    return ["configs/tiny.yaml", f"run.out_dir={out}", "train.steps=6", "checkpoint.every=2",
            FAKE + fn, "launch.gang_timeout_s=60", "launch.poll_s=0.2", *extra]


def _on(cluster, procs_per_node: int = 2) -> list[str]:
    """2 nodes x procs_per_node ranks; one rank per node takes the node's 2 CPUs, so the groups must spread."""
    cpus = [] if procs_per_node == 2 else ["launch.cpus_per_rank=2"]
    return [*cpus, "--nodes", "2", "--procs-per-node", str(procs_per_node), "--address", cluster.address]


def _metrics(out: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (the last record of a step wins: re-run steps after a resume)."""
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec:
            losses[rec["step"]] = rec["loss"]
    return losses


def _kill_when(pred, action, timeout_s: float = 120.0) -> threading.Thread:
    """Run `action()` in a thread once `pred()` holds (polled), while the launch runs in this thread."""

    def watch():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if pred():
                    action()
                    return
            except Exception:
                pass
            time.sleep(0.1)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _steps_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    return max(_metrics(out), default=0) if path.is_file() else 0


def test_placement_is_node_major_on_distinct_nodes(cluster):
    ray.init(address=cluster.address)
    try:
        p = reserve_gang(2, 2, cpus=1, gpus=0, timeout_s=60)
        try:
            nodes = [s.node_id for s in p.slots]
            assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2]
            assert [s.bundle_index for s in p.slots] == [0, 1, 0, 1]
            assert sorted({n["NodeID"] for n in ray.nodes() if n["Alive"]}) == sorted(set(nodes))
            again = sorted((s.node_ip, s.node_id) for s in p.slots)
            assert [(s.node_ip, s.node_id) for s in p.slots] == again
        finally:
            p.remove()
        with pytest.raises(Exception, match="could not reserve 3 node"):
            reserve_gang(3, 2, cpus=1, gpus=0, timeout_s=2)
        # all or none: the failed gang released what it had, so the full 2 x 2 fits again
        reserve_gang(2, 2, cpus=1, gpus=0, timeout_s=30).remove()
    finally:
        ray.shutdown()


def test_fake_job_env_and_losses(cluster, tmp_path, capsys):
    cfg = load_config(ROOT / "configs/tiny.yaml", _fake_args(tmp_path / "run", "run")[1:])
    ray.init(address=cluster.address)
    try:
        out = launch(cfg, nodes=2, procs_per_node=2)
    finally:
        ray.shutdown()
    assert out.restarts == 0 and out.world_size == 4
    res = out.result
    assert res.losses == pytest.approx(fake_trainer.expected_losses(cfg.train.seed, 6), rel=1e-12)
    assert res.env["RANK"] == "0" and res.env["WORLD_SIZE"] == "4" and res.env["LOCAL_RANK"] == "0"
    assert res.env["LOCAL_WORLD_SIZE"] == "2" and res.env["NODE_RANK"] == "0"
    assert 29500 <= int(res.env["MASTER_PORT"]) <= 29999
    printed = capsys.readouterr().out
    assert "gang of 4 ranks on 2 node(s)" in printed and "step 6 loss" in printed


def test_crash_restarts_from_checkpoint_then_gives_up(cluster, tmp_path, capsys):
    out = tmp_path / "run"
    rc = launch_main(_fake_args(out, "crash", "launch.max_restarts=1", *_on(cluster, 1)))
    err = capsys.readouterr()
    assert rc == 1
    assert "giving up after 1 restart(s)" in err.err and "was lost (its actor or node died)" in err.err
    assert err.out.count("restart 1/1 from the latest checkpoint") == 1
    # each attempt gets two steps further: steps 1..2 then a crash | 3..4 (resumed from step 2) then a crash
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*.json"))
    assert ckpts == ["step_2.json", "step_4.json"]


def test_hang_is_detected_by_progress_timeout(cluster, tmp_path, capsys):
    rc = launch_main(_fake_args(tmp_path / "run", "hang", "launch.max_restarts=0",
                                "launch.progress_timeout_s=4", *_on(cluster, 1)))
    assert rc == 1
    assert "treating the gang as hung" in capsys.readouterr().err


def test_fatal_error_is_not_restarted(cluster, tmp_path, capsys):
    rc = launch_main(_fake_args(tmp_path / "run", "bad_config", "launch.max_restarts=3", *_on(cluster, 1)))
    err = capsys.readouterr()
    assert rc == 1 and "ValueError: train.steps must be positive (injected)" in err.err
    assert "not restarted" in err.err and "restart 1/" not in err.out


def test_bad_inputs_give_clear_errors(cluster, tmp_path, capsys):
    t0 = time.monotonic()
    assert launch_main(_fake_args(tmp_path, "run", "--nodes", "1", "--procs-per-node", "1",
                                  "--address", "127.0.0.1:9")) == 1
    assert "cannot reach a Ray cluster at 127.0.0.1:9" in capsys.readouterr().err
    assert launch_main(_fake_args(tmp_path, "run", "--nodes", "1", "--procs-per-node", "1",
                                  "--address", "http://127.0.0.1:8265")) == 1
    assert "use `lctrain submit" in capsys.readouterr().err
    assert launch_main(_fake_args(tmp_path, "run", "parallel.tp=3", "--nodes", "2", "--procs-per-node", "2",
                                  "--address", cluster.address)) == 2
    assert "not divisible by tp*cp" in capsys.readouterr().err
    assert time.monotonic() - t0 < 30
    # world 6 (the global batch divides over it, so the pre-reservation check passes) needs a third node
    rc = launch_main(_fake_args(tmp_path, "run", "launch.gang_timeout_s=2", "train.global_batch_size=6",
                                "--nodes", "3", "--procs-per-node", "2", "--address", cluster.address))
    assert rc == 1 and "could not reserve 3 node(s) x 2 rank(s)" in capsys.readouterr().err


def _tiny(out: Path) -> list[str]:
    return ["configs/tiny.yaml", f"run.out_dir={out}", "train.steps=8", "checkpoint.every=2",
            "parallel.cp=2", "launch.gang_timeout_s=90", "launch.poll_s=0.2", "launch.max_restarts=2"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """`lctrain train --nproc 4` on the tiny config: the per-step losses every launch must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run([sys.executable, "-m", "lctrain", "train", *_tiny(out), "--nproc", "4"], cwd=ROOT,
                   check=True, capture_output=True, timeout=300)
    return _metrics(out)


def test_real_training_matches_local_ranks(cluster, reference_run, tmp_path):
    out = tmp_path / "run"
    args = _tiny(out) + _on(cluster)
    assert launch_main(args) == 0
    assert sorted(reference_run) == list(range(1, 9))
    assert _metrics(out) == reference_run


def _actor(suffix: str):
    (info,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(suffix)]
    return ray.get_actor(info["name"], namespace=info["namespace"])


def test_preempted_rank_and_preempted_driver_resume_to_same_loss(cluster, reference_run, tmp_path, capsys):
    """SIGTERM to one Ray worker process (a drained node): its rank tells the others at the step end, they save one
    checkpoint and return, and the supervisor restarts from it (no failure counted). Then SIGUSR1 to the driver
    (`sbatch --signal=B:USR1`): it tells every rank, they save, `lctrain launch` exits 75 (requeue); the requeued
    launch finishes with the uninterrupted run's losses."""
    import os
    import signal

    from lctrain.checkpoint.preempt import REQUEUE_EXIT

    out = tmp_path / "run"

    def sigterm_rank1():
        os.kill(ray.get(_actor("-a0-rank1").preflight.remote())["pid"], signal.SIGTERM)

    _kill_when(lambda: _steps_done(out) >= 3, sigterm_rank1)
    _kill_when(lambda: _steps_done(out) >= 5 and _actor("-a1-rank0"), lambda: os.kill(os.getpid(), signal.SIGUSR1))
    args = _tiny(out) + _on(cluster)
    assert launch_main(args) == REQUEUE_EXIT
    printed = capsys.readouterr().out
    assert "a rank was preempted and saved a checkpoint" in printed and "restart 1/" not in printed
    assert "preempted: the ranks saved a checkpoint and stopped (SIGUSR1)" in printed
    stopped_at = max(_metrics(out))
    assert 5 <= stopped_at < 8
    assert launch_main(args) == 0  # the requeued job
    assert _metrics(out) == reference_run


def test_lost_node_resumes_to_same_loss(cluster, reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    # The launch runs in a thread: Ray nodes can only be started from the main thread, and the replacement
    # node (what an autoscaler would bring) is added after the worker node holding ranks 2-3 is removed.
    rc = []
    job = threading.Thread(target=lambda: rc.append(launch_main(_tiny(out) + _on(cluster))), daemon=True)
    job.start()
    deadline = time.monotonic() + 240
    while _steps_done(out) < 3 and job.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.is_alive(), "the job ended before the node could be removed"
    (worker,) = cluster.worker_nodes
    cluster.remove_node(worker)
    cluster.add_node(num_cpus=2)
    job.join(timeout=300)
    assert rc == [0]
    assert "restart 1/2 from the latest checkpoint" in capsys.readouterr().out
    assert _metrics(out) == reference_run


@pytest.mark.slow
def test_long_save_is_not_taken_for_a_hang(cluster, tmp_path, capsys):
    """A save of 45 s inside a heartbeat phase, with launch.progress_timeout_s = 20: no restart. (Generous
    margins: on a loaded 2-core machine one fake step can take seconds.)"""
    rc = launch_main(_fake_args(tmp_path / "run", "slow_save", "train.steps=2", "launch.max_restarts=0",
                                "launch.progress_timeout_s=20", *_on(cluster, 1)))
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-2000:]
    assert "hung" not in printed.err + printed.out and "finished after 0 restart(s)" in printed.out


@pytest.mark.slow
def test_elastic_restart_on_fewer_nodes(cluster, tmp_path, capsys):
    """3 nodes x 1 rank; one node removed for good: the job finishes on 2 (dp 3 -> 2, gradient accumulation
    2 -> 3, same global batch) and its losses equal the uninterrupted run's within float32 tolerance."""
    base = ["configs/tiny.yaml", "train.steps=6", "checkpoint.every=2", "train.global_batch_size=6",
            "launch.gang_timeout_s=90", "launch.poll_s=0.2", "launch.max_restarts=2", "launch.replacement_timeout_s=5"]
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    subprocess.run([sys.executable, "-m", "lctrain", "train", *base, f"run.out_dir={ref_out}", "--nproc", "2"],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    extra = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    rc = []
    args = [*base, f"run.out_dir={out}", "launch.cpus_per_rank=2", "--nodes", "3", "--procs-per-node", "1",
            "--address", cluster.address]
    job = threading.Thread(target=lambda: rc.append(launch_main(args)), daemon=True)
    job.start()
    deadline = time.monotonic() + 240
    while _steps_done(out) < 3 and job.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.is_alive(), "the job ended before the node could be removed"
    cluster.remove_node(extra)  # for good: no replacement comes
    job.join(timeout=400)
    printed = capsys.readouterr().out
    assert rc == [0]
    assert "continuing on 2 node(s) instead of 3 (dp 3 -> 2, gradient accumulation 2 -> 3" in printed
    ref, got = _metrics(ref_out), _metrics(out)
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step, loss in ref.items():
        assert got[step] == pytest.approx(loss, rel=2e-5), step


@pytest.mark.slow
def test_elastic_shrink_then_grow_back_when_the_node_returns(cluster, tmp_path, capsys):
    """2 nodes x 1 rank (fake trainer); the worker node removed: the job goes on on 1 node (the smaller layout
    re-checked first); a node added back: the supervisor stops the ranks at a step with a checkpoint and restarts
    on 2 nodes. The losses are the fake trainer's whatever the world (up to float64 rounding of its mean)."""
    out = tmp_path / "run"
    args = _fake_args(out, "run", "train.steps=40", "launch.cpus_per_rank=2", "launch.replacement_timeout_s=2",
                      "launch.max_restarts=2", "--nodes", "2", "--procs-per-node", "1", "--address", cluster.address)
    rc = []
    job = threading.Thread(target=lambda: rc.append(launch_main(args)), daemon=True)
    job.start()
    deadline = time.monotonic() + 120
    while _steps_done(out) < 3 and job.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    (worker,) = cluster.worker_nodes
    cluster.remove_node(worker)

    def shrunk() -> bool:
        return any(a["name"].endswith("-a1-rank0") for a in ray.util.list_named_actors(all_namespaces=True))

    while not shrunk() and job.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert shrunk(), "the job did not restart on the node left"
    cluster.add_node(num_cpus=2)
    job.join(timeout=180)
    printed = capsys.readouterr().out
    assert rc == [0], printed[-3000:]
    assert "continuing on 1 node(s) instead of 2" in printed
    assert "growing back to 2 node(s)" in printed and "2 nodes are available again (running on 1)" in printed
    got, want = _metrics(out), fake_trainer.expected_losses(1234, 40)
    assert sorted(got) == sorted(want) and all(got[k] == pytest.approx(v, rel=1e-12) for k, v in want.items())


def test_smaller_layout_is_rechecked_against_memory(tmp_path, monkeypatch):
    """Before an elastic restart: a layout that fits passes; one predicted past the device's memory is refused."""
    from lctrain.launch.supervisor import check_layout

    cfg = load_config("configs/tiny.yaml", [f"run.out_dir={tmp_path}"])
    monkeypatch.delenv("LCTRAIN_HARDWARE", raising=False)
    assert check_layout(cfg, 2, 1) == []
    big = load_config("configs/tiny.yaml", [f"run.out_dir={tmp_path}", "model.vocab_size=4000000",
                                            "model.hidden_size=4096", "model.num_heads=32", "model.num_kv_heads=8",
                                            "model.layer_pattern=A", "model.num_layers=2"])
    (problem,) = check_layout(big, 2, 1, hardware="h100")
    assert "exceeds the h100 device's 80 GB" in problem
