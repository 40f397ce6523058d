"""Run a training job as a gang of Ray actors and restart it from its latest checkpoint when a rank is lost.

    result = launch(cfg, nodes=2, procs_per_node=4)     # after ray.init(...)

One attempt: reserve the gang (placement.reserve_gang), start one RankWorker per bundle in rank order,
preflight them (entrypoint importable, where each runs), pick MASTER_ADDR/PORT on rank 0's node, set RANK,
WORLD_SIZE, LOCAL_RANK, ... and call the entrypoint on every rank. The supervisor then watches the actors'
`run` calls (an actor or node that dies fails its call at once) and every rank's heartbeat
(lctrain.train.heartbeat, asked of each actor every `launch.poll_s`): a rank that has not beaten for
`launch.progress_timeout_s` outside a long phase, or has been inside one (init, load, save, eval, which beat
from a thread) for `launch.phase_timeout_s`, counts as hung, so a long save or eval is not taken for a hang.
Rank 0's metrics.jsonl is streamed to the log. On a failure the whole gang is torn down and a new attempt
starts with resume="auto", which picks up the latest complete checkpoint in run.out_dir, up to
`launch.max_restarts` times. Mistakes that a restart cannot fix (ValueError, TypeError, ImportError from the
entrypoint) end the launch at once.

Elastic restart: a restart first waits `launch.replacement_timeout_s` for the whole gang (a lost node
replaced). If the cluster cannot hold it by then and `launch.elastic` is on, the job continues on fewer
nodes: the largest node count the alive nodes can hold whose world size fits the layout (tp * cp divides it)
and the global batch (train.global_batch_size divisible by micro_batch_size * dp). DP shrinks, gradient
accumulation grows, the global batch (hence the loss curve, up to float32 summation order) stays the same;
the checkpoint is resharded onto the new layout when loaded. Growing back: while a shrunk gang runs, the
supervisor checks every few seconds whether the cluster holds the original node count again; if so it asks the
ranks to stop at the next step with a checkpoint (the preemption path below) and restarts on all the nodes.

Preemption: `launch` installs lctrain's preemption handler (SIGTERM, SIGUSR1: what Kubernetes and
`sbatch --signal=B:USR1@<grace>` send) in the driver. On its own notice the supervisor passes it to every rank
(`RankWorker.preempt`); the ranks save at the next step end and return, and `launch` returns with `preempted` set
(`lctrain launch` exits with preempt.REQUEUE_EXIT for the scheduler to requeue). A notice that reached a rank
directly (SIGTERM to a Ray worker process: a node drained) ends the attempt the same way, with a checkpoint, and
the supervisor restarts from it at once (not counted against launch.max_restarts).

run.out_dir must be visible to every node at the same path (a shared filesystem) for a restart on other
nodes to find the checkpoint; a relative out_dir is resolved against the launching process's directory.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lctrain.checkpoint import preempt
from lctrain.launch.placement import Placement, PlacementError, cluster_has_gpus, reserve_gang
from lctrain.launch.worker import RankWorker


class LaunchError(RuntimeError):
    """The job failed for good: a fatal error, or more failures than launch.max_restarts allows."""


class RankFailure(Exception):
    """One attempt of the gang failed (a rank died, raised, or stopped making progress)."""

    def __init__(self, message: str, fatal: bool = False, lost: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal
        self.lost = lost
        """The rank's actor or node died (the root cause when its peers' collectives fail after it)."""


#: Seconds to wait, after a rank's call fails, for the others' (to report a lost rank as the root cause).
ROOT_CAUSE_WAIT_S = 5.0

#: Errors from the entrypoint that a restart would only repeat.
FATAL_ERRORS = (ValueError, TypeError, ImportError)


@dataclass
class LaunchResult:
    """What `launch` returns."""

    result: Any
    """Rank 0's return value of the entrypoint (a TrainResult for the trainer)."""
    restarts: int
    """How many times the gang was restarted."""
    world_size: int
    """World size of the last attempt (smaller than the first after an elastic restart)."""
    nodes: int = 0
    """Nodes of the last attempt."""
    failures: list[str] = field(default_factory=list)
    """One line per failed attempt."""
    preempted: bool = False
    """The launcher itself got a preemption notice: the ranks saved a checkpoint and stopped (requeue the job)."""


def _short(err: BaseException, limit: int = 400) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def classify(rank: int, err: BaseException) -> RankFailure:
    """Turn the exception of rank `rank`'s run call into a RankFailure (fatal when a restart cannot help)."""
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = getattr(err, "cause", None)
        if isinstance(cause, FATAL_ERRORS):
            return RankFailure(f"rank {rank} raised {type(cause).__name__}: {_short(cause)}", fatal=True)
        name = type(cause).__name__ if cause is not None else "an error"
        return RankFailure(f"rank {rank} raised {name}: {_short(cause if cause is not None else err)}")
    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError,
                        ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError)):
        return RankFailure(f"rank {rank} was lost (its actor or node died): {_short(err, 200)}", lost=True)
    return RankFailure(f"rank {rank} failed: {type(err).__name__}: {_short(err)}")


class Gang:
    """One attempt: the rank actors of a placement, their run calls, and rank 0's progress."""

    def __init__(self, placement: Placement, cfg: Any, gpus: float, attempt: int, tag: str,
                 log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.lcfg = cfg.launch
        self.gpus = gpus
        self.attempt = attempt
        self.log = log
        worker_cls = ray.remote(RankWorker)
        self.actors = [
            worker_cls.options(
                name=f"lctrain-{tag}-rank{rank}", num_cpus=self.lcfg.cpus_per_rank, num_gpus=gpus,
                max_concurrency=4, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    slot.group, placement_group_bundle_index=slot.bundle_index),
            ).remote(self.lcfg.entrypoint)
            for rank, slot in enumerate(placement.slots)
        ]
        self.placement = placement
        self.told = False
        """The ranks were asked to stop at the next step with a checkpoint (preemption or growing back)."""
        self.grow_to = 0
        """Restart on this many nodes once this attempt has stopped (growing back); 0: no."""

    def tell_stop(self, reason: str) -> None:
        """Ask every rank to save at the next step end and return (once)."""
        if self.told:
            return
        self.told = True
        self.log(f"{reason}: asking the ranks to save a checkpoint after this step and stop")
        for a in self.actors:
            a.preempt.remote(reason)

    def _get(self, refs: list[ray.ObjectRef], what: str) -> list[Any]:
        """ray.get of one call per rank, turning the first failure into a RankFailure."""
        ready, not_ready = ray.wait(refs, num_returns=len(refs), timeout=self.lcfg.gang_timeout_s)
        if not_ready:
            ranks = [refs.index(r) for r in not_ready]
            raise RankFailure(f"{what}: ranks {ranks} did not answer within {self.lcfg.gang_timeout_s:.0f} s")
        out = []
        for rank, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except Exception as err:
                failure = classify(rank, err)
                raise RankFailure(f"{what}: {failure}", failure.fatal) from None
        return out

    def environments(self) -> list[dict[str, str]]:
        """Preflight every rank, then build each rank's torch.distributed environment."""
        infos = self._get([a.preflight.remote() for a in self.actors], "preflight")
        world = len(infos)
        if infos[0]["node_id"] != self.placement.slots[0].node_id:
            raise RankFailure("preflight: rank 0 does not run on the node that holds its bundle")
        by_node: dict[str, list[int]] = {}
        for rank, info in enumerate(infos):
            by_node.setdefault(info["node_id"], []).append(rank)
        (port,) = self._get([self.actors[0].free_port.remote(self.lcfg.port_min, self.lcfg.port_max,
                                                             time.time_ns() + self.attempt)], "MASTER_PORT")
        master = infos[0]["ip"]
        envs = []
        for rank, info in enumerate(infos):
            local = by_node[info["node_id"]]
            env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local.index(rank)),
                   "LOCAL_WORLD_SIZE": str(len(local)), "NODE_RANK": str(list(by_node).index(info["node_id"])),
                   "MASTER_ADDR": master, "MASTER_PORT": str(port)}
            # Each local rank sees all of its node's GPUs, its own at index LOCAL_RANK (NCCL wants peers visible).
            node_gpus = [infos[r]["gpu_ids"][0] for r in local if infos[r]["gpu_ids"]]
            if len(node_gpus) == len(local):
                env["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus)
            envs.append(env)
        hosts = [f"{infos[r[0]]['host']}({infos[r[0]]['ip']}): ranks {r[0]}-{r[-1]}" for r in by_node.values()]
        self.log(f"gang of {world} ranks on {len(by_node)} node(s), master {master}:{port}; " + "; ".join(hosts))
        return envs

    def supervise(self, resume: str) -> Any:
        """Run the entrypoint on every rank; return rank 0's result or raise RankFailure."""
        envs = self.environments()
        metrics = os.path.join(self.cfg.run.out_dir, "metrics.jsonl")
        (offset,) = self._get([self.actors[0].file_size.remote(metrics)], "progress")
        pending = {a.run.remote(self.cfg, env, resume): rank for rank, (a, env) in enumerate(zip(self.actors, envs))}
        results: dict[int, Any] = {}
        progress_ref, partial = None, b""
        beats: dict[int, tuple[ray.ObjectRef, float]] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.lcfg.poll_s)
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                except Exception as err:
                    raise self._root_cause(classify(rank, err), pending) from None
            if progress_ref is None:
                progress_ref = self.actors[0].read_from.remote(metrics, offset)
            # Once every rank is done, drain the rest of rank 0's metrics before returning.
            done, _ = ray.wait([progress_ref], timeout=None if not pending else 0)
            if done:
                try:
                    data, new_offset = ray.get(progress_ref)
                except Exception:
                    data, new_offset = b"", offset
                progress_ref = None
                if new_offset < offset:
                    partial = b""
                offset = new_offset
                *lines, partial = (partial + data).split(b"\n")
                for line in lines:
                    self._report(line)
            if pending:
                if preempt.requested():
                    self.tell_stop(f"preemption notice ({preempt.reason()})")
                self._check_growth()
                self._check_heartbeats(beats, set(pending.values()))
        return results[0]

    def _root_cause(self, first: RankFailure, pending: dict) -> RankFailure:
        """The failure to report for an attempt whose first failed call is `first`.

        When one rank dies, its peers' collectives fail too, and one of those errors may arrive first ("... caused
        by a remote worker crashing"). Wait briefly (ROOT_CAUSE_WAIT_S) for the other calls, and name a lost rank
        (actor or node died) first, the rest after it.
        """
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=ROOT_CAUSE_WAIT_S)
        failures = [first]
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as err:
                failures.append(classify(pending[ref], err))
        failures.sort(key=lambda f: not f.lost)  # stable: a lost rank first, else the first failure
        if len(failures) == 1:
            return first
        return RankFailure(f"{failures[0]} (then: " + "; ".join(str(f) for f in failures[1:]) + ")",
                           any(f.fatal for f in failures))

    def _check_growth(self) -> None:
        """After an elastic shrink: when the cluster holds the original gang again, stop this attempt to grow."""
        nodes, target = len(self.placement.groups), getattr(self, "target_nodes", 0)
        now = time.monotonic()
        if self.told or nodes >= target or now < getattr(self, "_next_growth_check", 0.0):
            return
        self._next_growth_check = now + max(self.lcfg.poll_s, 5.0)
        per_node = len(self.actors) // nodes
        if _nodes_that_fit(per_node, self.lcfg.cpus_per_rank, self.gpus) >= target:
            self.grow_to = target
            self.tell_stop(f"{target} nodes are available again (running on {nodes})")

    def _check_heartbeats(self, beats: dict[int, tuple[ray.ObjectRef, float]], running: set[int]) -> None:
        """Ask every running rank for its heartbeat (one call in flight per rank); RankFailure if one is hung."""
        now = time.monotonic()
        for rank in sorted(running):
            if rank not in beats:
                beats[rank] = (self.actors[rank].heartbeat.remote(), now)
                continue
            ref, asked = beats[rank]
            done, _ = ray.wait([ref], timeout=0)
            if not done:
                # An actor answers from its own thread even while training; no answer at all is a stuck process.
                if now - asked > max(self.lcfg.progress_timeout_s, self.lcfg.gang_timeout_s):
                    raise RankFailure(f"rank {rank} has not answered a heartbeat request for {now - asked:.0f} s; "
                                      "treating the gang as hung")
                continue
            del beats[rank]
            try:
                hb = ray.get(ref)
            except Exception:
                continue  # a dead actor fails its run call too, which reports it
            if hb["phase"] is None and hb["age_s"] > self.lcfg.progress_timeout_s:
                raise RankFailure(f"rank {rank} has not beaten for {hb['age_s']:.0f} s after step {hb['step']} "
                                  f"(launch.progress_timeout_s = {self.lcfg.progress_timeout_s:g}); "
                                  "treating the gang as hung")
            if hb["phase"] is not None and hb["phase_age_s"] > self.lcfg.phase_timeout_s:
                raise RankFailure(f"rank {rank} has been in its {hb['phase']} phase for {hb['phase_age_s']:.0f} s "
                                  f"(launch.phase_timeout_s = {self.lcfg.phase_timeout_s:g}); "
                                  "treating the gang as hung")

    def _report(self, line: bytes) -> bool:
        """Stream one metrics.jsonl line of rank 0; True when it is a step record."""
        try:
            rec = json.loads(line)
        except ValueError:
            return False
        if not isinstance(rec, dict) or "step" not in rec:
            return False
        parts = [f"step {rec['step']}"]
        for key in ("loss", "lr", "tokens_per_s"):
            if isinstance(rec.get(key), (int, float)):
                parts.append(f"{key} {rec[key]:.6g}")
        self.log(" ".join(parts))
        return True

    def stop(self) -> None:
        """Kill every rank actor (idempotent)."""
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass


def _print(msg: str) -> None:
    print(f"[lctrain launch] {msg}", flush=True)


def _nodes_that_fit(procs_per_node: int, cpus: float, gpus: float) -> int:
    """Alive nodes whose total resources hold one node's group of ranks."""
    need = {"CPU": procs_per_node * cpus, "GPU": procs_per_node * gpus}
    return sum(1 for n in ray.nodes() if n.get("Alive")
               and all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in need.items() if v))


def shrink(cfg: Any, nodes: int, procs_per_node: int, available: int) -> int | None:
    """The largest node count below `nodes` (and at most `available`) whose world size fits the layout and
    the global batch; None if there is none."""
    tp_cp = cfg.parallel.tp * cfg.parallel.cp
    for n in range(min(nodes - 1, available), 0, -1):
        world = n * procs_per_node
        if world % tp_cp:
            continue
        dp = world // tp_cp
        if cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp) == 0:
            return n
    return None


def check_layout(cfg: Any, nodes: int, procs_per_node: int, hardware: str | None = None,
                 rehearse_timeout_s: float = 900.0) -> list[str]:
    """Why `cfg` cannot run on nodes x procs_per_node (empty: it can), checked before an elastic restart onto a
    new layout: the pre-reservation check (with its predicted-memory check when the device is known), then, when
    the device is known (`hardware`, else env LCTRAIN_HARDWARE), the rehearsal of the layout's busiest rank
    (`lctrain rehearse`, in a subprocess: meta tensors, nothing allocated) against the device's usable memory.
    """
    import subprocess
    import sys
    import tempfile

    from lctrain.config import save_config
    from lctrain.preflight import Target, preflight

    hardware = hardware or os.environ.get("LCTRAIN_HARDWARE") or None
    world = nodes * procs_per_node
    problems = preflight(cfg, Target(world, procs_per_node, nodes, hardware=hardware))
    if problems or not hardware:
        return problems
    from lctrain.plan.hardware import get_hardware

    usable = get_hardware(hardware).usable_bytes
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        save_config(cfg, path)
        res = subprocess.run([sys.executable, "-m", "lctrain", "rehearse", path, "--gpus", str(world),
                              "--gpus-per-node", str(procs_per_node), "--hardware", hardware, "--steps", "2",
                              "--resume", "none", "--json"], capture_output=True, text=True,
                             timeout=rehearse_timeout_s)
    try:
        report = json.loads(res.stdout)
    except ValueError:
        return [f"the rehearsal of {nodes} node(s) x {procs_per_node} failed (exit {res.returncode}): "
                f"{res.stderr.strip()[-400:]}"]
    errors = [f"{f['op']}: {f['detail']} ({f['line']})" for f in report.get("findings", []) if f.get("kind") == "error"]
    if errors:
        return [f"the rehearsal of {nodes} node(s) x {procs_per_node} stopped: " + "; ".join(errors)]
    if report["peak_bytes"] > usable:
        return [f"the rehearsal of {nodes} node(s) x {procs_per_node} peaks at {report['peak_bytes'] / 1e9:.1f} GB "
                f"per GPU, above the {hardware}'s usable {usable / 1e9:.1f} GB"]
    return []


def launch(cfg: Any, nodes: int, procs_per_node: int, resume: str = "auto",
           log: Callable[[str], None] = _print) -> LaunchResult:
    """Run `cfg.launch.entrypoint` on nodes x procs_per_node ranks of the connected Ray cluster.

    Args:
        cfg: the run Config (its `launch` section configures this function).
        nodes: number of nodes; each gets `procs_per_node` consecutive ranks.
        procs_per_node: ranks per node (GPUs per node on a GPU cluster).
        resume: resume mode of the first attempt ("auto" | "none" | PATH); restarts always use "auto".
        log: where progress and restart messages go.

    Returns:
        LaunchResult with rank 0's result, the number of restarts and the final world size.

    Raises:
        ValueError: the layout does not fit nodes x procs_per_node (before anything is reserved).
        PlacementError: the cluster cannot hold the gang within launch.gang_timeout_s (and, after a failure,
            no smaller gang fits either).
        LaunchError: a fatal rank error, or more than launch.max_restarts failures.
    """
    lcfg = cfg.launch
    world = nodes * procs_per_node
    cfg.parallel.validate(world)
    if procs_per_node % cfg.parallel.tp:
        warnings.warn(f"parallel.tp={cfg.parallel.tp} does not divide --procs-per-node={procs_per_node}: "
                      "some tensor-parallel groups will span two nodes", stacklevel=2)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=os.path.abspath(cfg.run.out_dir)))
    gpus = lcfg.gpus_per_rank if lcfg.gpus_per_rank is not None else (1.0 if cluster_has_gpus() else 0.0)
    tag = uuid.uuid4().hex[:8]
    failures: list[str] = []
    target, attempt, restart_reason = nodes, 0, None
    own_handler = not preempt.installed() and preempt.install()
    preempt.arm()
    try:
        while True:
            if restart_reason is not None:
                log(f"restart {len(failures)}/{lcfg.max_restarts} from the latest checkpoint in {cfg.run.out_dir}"
                    if restart_reason == "failure" else
                    f"restart from the latest checkpoint in {cfg.run.out_dir} ({restart_reason})")
            placement = _reserve(cfg, target, procs_per_node, gpus, attempt, log)
            nodes = len(placement.groups)
            gang = None
            try:
                gang = Gang(placement, cfg, gpus, attempt, f"{tag}-a{attempt}", log)
                gang.target_nodes = target if lcfg.elastic else 0
                result = gang.supervise(resume if attempt == 0 else "auto")
                stopped = bool(getattr(result, "preempted", False))
                if stopped and preempt.requested():
                    log(f"preempted: the ranks saved a checkpoint and stopped ({preempt.reason()}); requeue the job")
                    preempt.clear()  # acted on: a later launch in this process starts clean
                    return LaunchResult(result, attempt, nodes * procs_per_node, failures, nodes, preempted=True)
                if not stopped:
                    log(f"finished after {attempt} restart(s)")
                    return LaunchResult(result, attempt, nodes * procs_per_node, failures, nodes)
                restart_reason = (f"growing back to {gang.grow_to} node(s)" if gang.grow_to
                                  else "a rank was preempted and saved a checkpoint")
            except RankFailure as failure:
                if failure.fatal:
                    raise LaunchError(f"{failure} (not restarted: a restart would fail the same way)") from None
                failures.append(f"attempt {attempt}: {failure}")
                log(f"attempt {attempt} failed: {failure}")
                if len(failures) > lcfg.max_restarts:
                    break
                restart_reason = "failure"
            finally:
                if gang is not None:
                    gang.stop()
                placement.remove()
            attempt += 1
    finally:
        preempt.disarm()
        if own_handler:
            preempt.uninstall()
    raise LaunchError(f"giving up after {lcfg.max_restarts} restart(s) (launch.max_restarts); failures:\n  "
                      + "\n  ".join(failures))


def _reserve(cfg: Any, nodes: int, procs_per_node: int, gpus: float, attempt: int,
             log: Callable[[str], None]) -> Placement:
    """The gang of this attempt: all `nodes`, or after a failure (elastic) as many as are left."""
    lcfg = cfg.launch
    if attempt == 0:
        return reserve_gang(nodes, procs_per_node, lcfg.cpus_per_rank, gpus, lcfg.gang_timeout_s)
    try:
        return reserve_gang(nodes, procs_per_node, lcfg.cpus_per_rank, gpus, lcfg.replacement_timeout_s)
    except PlacementError:
        if not lcfg.elastic:
            raise
    fewer = shrink(cfg, nodes, procs_per_node, _nodes_that_fit(procs_per_node, lcfg.cpus_per_rank, gpus))
    while fewer is not None:
        # The smaller layout holds more state per GPU: re-check it (memory included) before the first step.
        problems = check_layout(cfg, fewer, procs_per_node)
        if not problems:
            break
        log(f"{fewer} node(s) x {procs_per_node} would not work: " + "; ".join(problems))
        fewer = shrink(cfg, fewer, procs_per_node, fewer - 1)
    if fewer is None:
        raise PlacementError(f"no replacement for the lost node(s) within launch.replacement_timeout_s = "
                             f"{lcfg.replacement_timeout_s:g} s, and no smaller gang fits the layout, the batch "
                             "and the memory")
    tp_cp, gbs, mbs = cfg.parallel.tp * cfg.parallel.cp, cfg.train.global_batch_size, cfg.train.micro_batch_size
    dp_old, dp_new = nodes * procs_per_node // tp_cp, fewer * procs_per_node // tp_cp
    log(f"no replacement within {lcfg.replacement_timeout_s:g} s: continuing on {fewer} node(s) instead of {nodes} "
        f"(dp {dp_old} -> {dp_new}, gradient accumulation {gbs // (mbs * dp_old)} -> {gbs // (mbs * dp_new)}, "
        f"global batch {gbs} kept)")
    return reserve_gang(fewer, procs_per_node, lcfg.cpus_per_rank, gpus, lcfg.gang_timeout_s)
