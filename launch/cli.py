"""`lctrain launch`, `lctrain submit` and `lctrain job`: the command-line side of the Ray launcher.

    lctrain launch CONFIG [k=v ...] --nodes N --procs-per-node G [--address HOST:PORT|auto] [--resume MODE] [--dry-run]
    lctrain submit CONFIG [k=v ...] --address http://HEAD:8265 --nodes N --procs-per-node G [--wait] [--dry-run]
    lctrain job status|logs|stop ID --address http://HEAD:8265

Both `launch` and `submit` run the pre-reservation check (`lctrain.preflight`) at the target world size first:
a config that cannot run there fails in seconds, with every reason, before any cluster is contacted.
`--dry-run` stops after that check (no Ray, no job server needed).

Without --address (and without RAY_ADDRESS), `launch` starts a private local Ray cluster without a
dashboard (no HTTP server) and with Ray's token authentication (on by default). Exit codes: 0 success, 1 the job
or the cluster failed, 2 a usage or config error.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import warnings

# Ray, the supervisor (and through it torch's distributed stack) are imported where a cluster is used, not here:
# `--dry-run` runs the pre-reservation check only and must start in about the time of `import torch`.


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or joined."""


def _err(cmd: str, msg: str) -> None:
    print(f"lctrain {cmd}: error: {msg}", file=sys.stderr, flush=True)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an unreachable HOST:PORT (ray.init would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"--address {address!r} is not HOST:PORT (the Ray head's GCS address, e.g. "
                           "10.0.0.1:6379), 'auto', or 'local'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise ClusterError(f"cannot reach a Ray cluster at {address}: {err}. Start one with "
                           "`ray start --head` (see launch/slurm, launch/k8s) or leave --address out to run on a "
                           "local cluster") from None


def connect_ray(address: str | None) -> None:
    """Join the Ray cluster at `address`, or start a local one when there is none.

    Args:
        address: HOST:PORT of a running head, "auto" (the cluster started on this machine by `ray start`),
            "local" or None (RAY_ADDRESS when set, else a new local cluster: no dashboard, token auth on).
    """
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or "local"
    if address.startswith(("http://", "https://")):
        raise ClusterError(f"{address} is a job-server URL: use `lctrain submit --address {address}`, or give "
                           "`lctrain launch` the head's GCS address (HOST:6379)")
    if address not in ("local", "auto"):
        _check_reachable(address)
    import ray

    try:
        if address == "local":
            # No dashboard, so no job server or HTTP port; Ray 2.60 binds its core ports to the node's
            # routable IP whatever is asked, so the cluster token (on by default) is what guards them.
            if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
                warnings.warn("RAY_AUTH_MODE=disabled: the local Ray cluster accepts unauthenticated clients",
                              stacklevel=2)
            ray.init(address="local", include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=True)
        else:
            ray.init(address=address, log_to_driver=True)
    except ray.exceptions.AuthenticationError as err:
        raise ClusterError(f"the Ray cluster at {address} refused this client: {err}") from None
    except ConnectionError as err:
        raise ClusterError(f"cannot connect to a Ray cluster at {address}: {err}") from None


def _launch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lctrain launch", description="Run a training job on a Ray cluster.")
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--procs-per-node", type=int, required=True, help="ranks per node (GPUs per node)")
    p.add_argument("--address", default=None,
                   help="Ray head HOST:PORT or 'auto'; default: $RAY_ADDRESS, else a new local cluster")
    p.add_argument("--resume", default="auto", help="auto | none | PATH (first attempt; restarts use auto)")
    p.add_argument("--dry-run", action="store_true",
                   help="run the pre-reservation check at nodes x procs-per-node and exit (no Ray)")
    p.add_argument("--hardware", default=None, help=HARDWARE_HELP)
    return p


HARDWARE_HELP = ("the GPU the job runs on (h100 | h200 | a100-80g; default $LCTRAIN_HARDWARE): the check then "
                 "includes the predicted memory per GPU")


def _checked_config(cmd: str, config: str, overrides: list[str], nodes: int, procs_per_node: int,
                    ray_job: bool, dry_run: bool, one_machine: bool = False, hardware: str | None = None):
    """Load the config and run the pre-reservation check; returns the config, or the exit code (2) on a problem.

    With `dry_run`, prints the layout and returns 0 when the check passes.
    """
    from lctrain.config import load_config
    from lctrain.preflight import Target, describe, preflight

    if nodes < 1 or procs_per_node < 1:
        _err(cmd, f"--nodes and --procs-per-node must be >= 1, got {nodes}, {procs_per_node}")
        return 2
    try:
        cfg = load_config(config, overrides)
    except (ValueError, OSError) as err:
        _err(cmd, str(err))
        return 2
    target = Target(nodes * procs_per_node, procs_per_node, nodes, ray_job=ray_job, one_machine=one_machine,
                    hardware=hardware)
    problems = preflight(cfg, target)
    if problems:
        _err(cmd, f"{config} cannot run on {nodes} node(s) x {procs_per_node} rank(s):\n"
             + "\n".join(f"  - {p}" for p in problems))
        return 2
    if dry_run:
        from lctrain.launch.network import nccl_transport

        print(f"[lctrain {cmd}] preflight OK: {describe(cfg, target)}", flush=True)
        for line in nccl_transport(nodes):
            print(f"[lctrain {cmd}] {line} (as seen from this machine)", flush=True)
        return 0
    return cfg


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


def launch_main(argv: list[str]) -> int:
    """`lctrain launch`: returns 0 when the job finished, 1 when it failed, 2 on a usage or config error, 75
    (lctrain.checkpoint.preempt.REQUEUE_EXIT) when it was preempted (SIGTERM/SIGUSR1) and saved a checkpoint."""
    args = _parse(_launch_parser(), argv)
    if isinstance(args, int):
        return args
    # Without --address (and RAY_ADDRESS) the "nodes" are this machine's private local cluster.
    one_machine = args.address == "local" or (args.address is None and not os.environ.get("RAY_ADDRESS"))
    cfg = _checked_config("launch", args.config, args.overrides, args.nodes, args.procs_per_node,
                          ray_job=False, dry_run=args.dry_run, one_machine=one_machine, hardware=args.hardware)
    if isinstance(cfg, int):
        return cfg
    import ray

    from lctrain.launch.placement import PlacementError
    from lctrain.launch.supervisor import LaunchError, launch

    try:
        connect_ray(args.address)
    except ClusterError as err:
        _err("launch", str(err))
        return 1
    try:
        out = launch(cfg, args.nodes, args.procs_per_node, resume=args.resume)
    except (LaunchError, PlacementError) as err:
        _err("launch", str(err))
        return 1
    except ValueError as err:
        _err("launch", str(err))
        return 2
    finally:
        ray.shutdown()
    if out.preempted:
        from lctrain.checkpoint.preempt import REQUEUE_EXIT

        print(f"[lctrain launch] preempted: checkpoint saved; exiting with {REQUEUE_EXIT} (requeue the job)",
              flush=True)
        return REQUEUE_EXIT
    losses = getattr(out.result, "losses", None)
    if isinstance(losses, dict) and losses:
        last = max(losses)
        print(f"[lctrain launch] done: step {last} loss {losses[last]:.6g}, {out.restarts} restart(s)", flush=True)
    return 0


def submit_main(argv: list[str]) -> int:
    """`lctrain submit`: prints the job id; with --wait, follows the job and returns 0 only if it succeeded."""
    from lctrain.launch import jobs

    p = argparse.ArgumentParser(prog="lctrain submit", description="Submit `lctrain launch` as a Ray job.")
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--address", required=True, help="the job server, e.g. http://HEAD:8265")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--procs-per-node", type=int, default=1)
    p.add_argument("--include", action="append", default=[],
                   help="extra file or directory shipped in the job's working directory (repeatable)")
    p.add_argument("--job-id", default=None, help="submission id to use (default: Ray picks one)")
    p.add_argument("--wait", action="store_true", help="wait for the job, print its logs, exit with its outcome")
    p.add_argument("--timeout", type=float, default=3600.0, help="with --wait: give up after this many seconds")
    p.add_argument("--dry-run", action="store_true",
                   help="run the pre-reservation check at nodes x procs-per-node and exit (no job server needed)")
    p.add_argument("--hardware", default=None, help=HARDWARE_HELP)
    args = _parse(p, argv)
    if isinstance(args, int):
        return args
    checked = _checked_config("submit", args.config, args.overrides, args.nodes, args.procs_per_node,
                              ray_job=True, dry_run=args.dry_run, hardware=args.hardware)
    if isinstance(checked, int):
        return checked
    try:
        client = jobs.connect(args.address)
        job_id = jobs.submit(client, args.config, args.overrides, args.nodes, args.procs_per_node,
                             args.include, args.job_id)
    except ValueError as err:
        _err("submit", str(err))
        return 2
    except jobs.JobError as err:
        _err("submit", str(err))
        return 1
    print(job_id, flush=True)
    if not args.wait:
        return 0
    status = jobs.wait(client, job_id, args.timeout)
    print(client.get_job_logs(job_id), end="", flush=True)
    print(f"job {job_id}: {status.value}", flush=True)
    return 0 if status == jobs.JobStatus.SUCCEEDED else 1


def job_main(argv: list[str]) -> int:
    """`lctrain job status|logs|stop ID --address URL`."""
    from lctrain.launch import jobs

    p = argparse.ArgumentParser(prog="lctrain job", description="Status, logs or stop of a submitted job.")
    p.add_argument("action", choices=["status", "logs", "stop"])
    p.add_argument("job_id")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                   help="the job server, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS)")
    args = _parse(p, argv)
    if isinstance(args, int):
        return args
    if not args.address:
        _err("job", "--address is required (the job server, e.g. http://HEAD:8265)")
        return 2
    try:
        client = jobs.connect(args.address)
        if args.action == "status":
            info = client.get_job_info(args.job_id)
            print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
        elif args.action == "logs":
            print(client.get_job_logs(args.job_id), end="")
        else:
            stopped = client.stop_job(args.job_id)
            print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    except jobs.JobError as err:
        _err("job", str(err))
        return 1
    except Exception as err:
        _err("job", f"{args.action} {args.job_id}: {' '.join(str(err).split())}")
        return 1
    return 0
