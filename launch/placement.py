"""Gang placement: reserve every rank of a run at once, node by node, in a deterministic rank order.

One STRICT_PACK placement group per node, each with one bundle per rank (CPU, plus a GPU on GPU clusters),
so a node's ranks stay together and a TP group (adjacent ranks) never crosses a node. All groups are
created together and waited on together: either the whole gang fits within the timeout or every group is
removed again (no half-placed job holding resources). Ranks are numbered node-major, nodes sorted by
(IP, node id), so a restart on the same nodes gives every node the same ranks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group


class PlacementError(RuntimeError):
    """The cluster could not hold the whole gang within the timeout."""


@dataclass
class Slot:
    """One rank's reservation: a bundle of a per-node placement group."""

    group: PlacementGroup
    bundle_index: int
    node_id: str
    node_ip: str


@dataclass
class Placement:
    """The reserved gang: one placement group per node and the slots in rank order (node-major)."""

    groups: list[PlacementGroup]
    slots: list[Slot]

    def remove(self) -> None:
        """Give the reservation back (killing any actor still placed in it)."""
        for g in self.groups:
            try:
                remove_placement_group(g)
            except Exception:  # already removed, or the cluster connection is gone
                pass


def rank_bundle(cpus: float, gpus: float) -> dict[str, float]:
    """The resources of one rank's bundle."""
    bundle = {"CPU": float(cpus)}
    if gpus:
        bundle["GPU"] = float(gpus)
    return bundle


def cluster_has_gpus() -> bool:
    """True when any alive node of the connected cluster offers GPUs."""
    return ray.cluster_resources().get("GPU", 0) > 0


def _alive_nodes() -> dict[str, str]:
    """node id -> IP of the alive nodes."""
    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}


def reserve_gang(nodes: int, procs_per_node: int, cpus: float, gpus: float, timeout_s: float) -> Placement:
    """Reserve `nodes` x `procs_per_node` rank bundles, all or none.

    Args:
        nodes: number of nodes (one STRICT_PACK group each).
        procs_per_node: ranks per node (bundles per group).
        cpus: CPUs per rank.
        gpus: GPUs per rank (0 in a CPU simulation).
        timeout_s: how long to wait for the whole gang.

    Returns:
        The Placement, slots in rank order: nodes sorted by (IP, node id), bundles in index order.

    Raises:
        PlacementError: not every group was placed within `timeout_s` (all groups are removed again), or
            two groups share a node (the cluster has fewer distinct nodes than asked for).
    """
    if nodes < 1 or procs_per_node < 1:
        raise ValueError(f"--nodes and --procs-per-node must be >= 1, got {nodes} and {procs_per_node}")
    bundle = rank_bundle(cpus, gpus)
    groups = [placement_group([dict(bundle) for _ in range(procs_per_node)], strategy="STRICT_PACK",
                              name=f"lctrain-node{i}") for i in range(nodes)]
    placement = Placement(groups, [])
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=nodes, timeout=timeout_s)
    if len(ready) < nodes:
        placement.remove()
        raise PlacementError(
            f"could not reserve {nodes} node(s) x {procs_per_node} rank(s) of {bundle} each within "
            f"{timeout_s:.0f} s (gang scheduling: all or none). Alive nodes: {len(_alive_nodes())}; "
            f"cluster resources: {_fmt(ray.cluster_resources())}; available now: {_fmt(ray.available_resources())}"
        )
    ips = _alive_nodes()
    per_group = []
    for g in groups:
        node_of_bundle = placement_group_table(g)["bundles_to_node_id"]
        (node_id,) = set(node_of_bundle.values())
        per_group.append((ips.get(node_id, ""), node_id, g))
    per_group.sort(key=lambda t: (t[0], t[1]))
    node_ids = [t[1] for t in per_group]
    if len(set(node_ids)) < nodes:
        placement.remove()
        raise PlacementError(
            f"the cluster placed {nodes} per-node groups on only {len(set(node_ids))} distinct node(s); "
            f"give each node exactly --procs-per-node ranks' worth of resources or lower --nodes")
    placement.groups = [t[2] for t in per_group]
    placement.slots = [Slot(g, b, node_id, ip) for ip, node_id, g in per_group for b in range(procs_per_node)]
    return placement


def wait_until_removed(placement: Placement, timeout_s: float = 30.0) -> None:
    """Wait until the placement table shows the gang's groups removed (their resources are free again)."""
    deadline = time.monotonic() + timeout_s
    for g in placement.groups:
        while time.monotonic() < deadline:
            try:
                if placement_group_table(g).get("state") == "REMOVED":
                    break
            except Exception:
                break
            time.sleep(0.1)


def _fmt(resources: dict[str, float]) -> str:
    keep = {k: v for k, v in resources.items() if k in ("CPU", "GPU") or k.startswith("accelerator")}
    return ", ".join(f"{k}={v:g}" for k, v in sorted(keep.items())) or "none"
