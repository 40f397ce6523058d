"""Which transport NCCL will use between nodes, told from the environment and what is installed (no GPU needed).

    for line in nccl_transport(nodes=2): print(line)

NCCL (2.x) goes over InfiniBand / RoCE verbs when libibverbs loads and an RDMA device has an ACTIVE port that
NCCL_IB_HCA admits, unless NCCL_NET / NCCL_IB_DISABLE say otherwise; else over TCP sockets on the interfaces of
NCCL_SOCKET_IFNAME (default: `ib*` first, then any but `lo` and `docker*`). A net plugin (libnccl-net.so, e.g.
AWS OFI for EFA) takes precedence when NCCL finds one. This reads the same things NCCL reads -- /sys/class/infiniband,
/sys/class/net, the dynamic linker's view of libibverbs, NCCL_* variables -- on the machine it runs on, so run it
where the ranks run (inside the image, on a worker node) for their answer.
"""
from __future__ import annotations

import ctypes.util
import importlib.metadata
import os
from pathlib import Path
from typing import Mapping


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _hca_filter(spec: str):
    """NCCL_IB_HCA's rule: comma list of NAME[:PORT]; `^` excludes them, `=` means exact names (else prefixes)."""
    spec = spec.strip()
    exclude = spec.startswith("^")
    spec = spec.lstrip("^")
    exact = spec.startswith("=")
    entries = [e.split(":") for e in spec.lstrip("=").split(",") if e]

    def listed(dev: str, port: str) -> bool:
        for e in entries:
            name_ok = dev == e[0] if exact else dev.startswith(e[0])
            if name_ok and (len(e) == 1 or e[1] == port):
                return True
        return False

    return (lambda d, p: not listed(d, p)) if exclude else listed


def rdma_ports(sys_ib: Path = Path("/sys/class/infiniband"), hca: str = "") -> list[tuple[str, str, str, str]]:
    """(device, port, state, link layer) of every RDMA port NCCL_IB_HCA admits."""
    admit = _hca_filter(hca) if hca else (lambda d, p: True)
    out = []
    for dev in sorted(p.name for p in sys_ib.glob("*")) if sys_ib.is_dir() else []:
        for port_dir in sorted((sys_ib / dev / "ports").glob("*")):
            if admit(dev, port_dir.name):
                state = _read(port_dir / "state").split(":")[-1].strip()  # "4: ACTIVE"
                out.append((dev, port_dir.name, state, _read(port_dir / "link_layer") or "InfiniBand"))
    return out


def socket_interfaces(sys_net: Path = Path("/sys/class/net"), ifname: str = "") -> list[str]:
    """The interfaces NCCL's socket transport would use (NCCL_SOCKET_IFNAME's rule: prefixes, `^` excludes,
    `=` exact; default: ib* if any, else all but lo and docker*)."""
    names = sorted(p.name for p in sys_net.glob("*")) if sys_net.is_dir() else []
    if ifname:
        exclude, rest = ifname.startswith("^"), ifname.lstrip("^")
        exact, items = rest.startswith("="), [i for i in rest.lstrip("=").split(",") if i]
        match = (lambda n: n in items) if exact else (lambda n: any(n.startswith(i) for i in items))
        return [n for n in names if match(n) != exclude]
    ib = [n for n in names if n.startswith("ib")]
    return ib or [n for n in names if n != "lo" and not n.startswith("docker")]


def nccl_version() -> str:
    for dist in ("nvidia-nccl-cu13", "nvidia-nccl-cu12"):
        try:
            return f"NCCL {importlib.metadata.version(dist)} ({dist})"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "no NCCL wheel installed (a CPU torch: the job uses gloo here)"


def nccl_transport(nodes: int, env: Mapping[str, str] | None = None, sys_ib: Path = Path("/sys/class/infiniband"),
                   sys_net: Path = Path("/sys/class/net"), verbs: str | None | bool = True) -> list[str]:
    """Lines saying which transport NCCL will use between `nodes` nodes, and why.

    Args:
        verbs: the libibverbs library found (a name), None when there is none; True: look it up.
    """
    env = os.environ if env is None else env
    if verbs is True:
        verbs = ctypes.util.find_library("ibverbs")
    lines = [nccl_version()]
    if nodes <= 1:
        return lines + ["NCCL between nodes: none (one node: NVLink / PCIe peer-to-peer or shared memory)"]
    ifname = env.get("NCCL_SOCKET_IFNAME", "")
    ifaces = socket_interfaces(sys_net, ifname)
    sockets = (f"TCP sockets on {','.join(ifaces) or 'NO interface'} (NCCL_SOCKET_IFNAME="
               f"{ifname or 'unset: ib*, else all but lo/docker'})")
    net = env.get("NCCL_NET", "")
    if env.get("NCCL_NET_PLUGIN") or ctypes.util.find_library("nccl-net"):
        lines.append("note: an NCCL net plugin (libnccl-net.so / NCCL_NET_PLUGIN) may take over (e.g. AWS OFI for EFA)")
    if net.lower() == "socket" or env.get("NCCL_IB_DISABLE", "0") == "1":
        return lines + [f"NCCL between nodes: {sockets}; IB is off (NCCL_NET={net or 'unset'}, "
                        f"NCCL_IB_DISABLE={env.get('NCCL_IB_DISABLE', '0')})"]
    hca = env.get("NCCL_IB_HCA", "")
    ports = rdma_ports(sys_ib, hca)
    active = [p for p in ports if p[2] == "ACTIVE"]
    why = None
    if not verbs:
        why = "libibverbs is not installed (the image ships rdma-core / libibverbs1 / ibverbs-providers)"
    elif not ports:
        why = (f"no RDMA device{' admitted by NCCL_IB_HCA=' + hca if hca else ''} in {sys_ib} "
               "(on Kubernetes: request the RDMA device plugin's resource)")
    elif not active:
        why = "no ACTIVE RDMA port: " + ", ".join(f"{d}:{p} {s}" for d, p, s, _ in ports)
    if why:
        fallback = f"NCCL between nodes: {sockets}, because {why}"
        if net.upper() == "IB":
            return lines + [f"NCCL_NET=IB but {why}: NCCL will fail to initialise"]
        return lines + [fallback]
    kinds = sorted({"RoCE" if layer == "Ethernet" else "InfiniBand" for _, _, _, layer in active})
    gid = env.get("NCCL_IB_GID_INDEX")
    roce = (f"; RoCE GID index {gid}" if gid else "; RoCE GID index: NCCL picks it (NCCL >= 2.21)") \
        if "RoCE" in kinds else ""
    return lines + [f"NCCL between nodes: {'/'.join(kinds)} verbs ({verbs}) on "
                    f"{', '.join(f'{d}:{p}' for d, p, _, _ in active)} (NCCL_IB_HCA={hca or 'unset: all'}){roce}; "
                    f"bootstrap over {','.join(ifaces) or 'NO interface'}"]
