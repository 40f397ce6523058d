"""`--dry-run`'s NCCL transport report on made-up machines: a fake /sys (RDMA ports, network interfaces), the
libibverbs lookup and NCCL_* variables decide IB/RoCE verbs or TCP sockets, as NCCL decides."""
from __future__ import annotations

from pathlib import Path

from lctrain.launch.network import nccl_transport, rdma_ports, socket_interfaces


def _machine(root: Path, ports: dict[str, tuple[str, str]], ifaces=("lo", "eth0", "ib0", "docker0")) -> tuple[Path, Path]:
    ib, net = root / "infiniband", root / "net"
    for name, (state, layer) in ports.items():
        dev, port = name.split(":")
        d = ib / dev / "ports" / port
        d.mkdir(parents=True)
        (d / "state").write_text(state + "\n")
        (d / "link_layer").write_text(layer + "\n")
    for i in ifaces:
        (net / i).mkdir(parents=True)
    return ib, net


def test_infiniband_when_verbs_and_an_active_port(tmp_path):
    ib, net = _machine(tmp_path, {"mlx5_0:1": ("4: ACTIVE", "InfiniBand"), "mlx5_1:1": ("1: DOWN", "InfiniBand")})
    lines = nccl_transport(2, {}, ib, net, verbs="libibverbs.so.1")
    assert lines[-1].startswith("NCCL between nodes: InfiniBand verbs (libibverbs.so.1) on mlx5_0:1 ")
    assert "bootstrap over ib0" in lines[-1]  # NCCL prefers ib* interfaces when NCCL_SOCKET_IFNAME is unset


def test_roce_reports_the_gid_index(tmp_path):
    ib, net = _machine(tmp_path, {"mlx5_0:1": ("4: ACTIVE", "Ethernet"), "mlx5_2:1": ("4: ACTIVE", "Ethernet")})
    env = {"NCCL_IB_HCA": "=mlx5_2", "NCCL_IB_GID_INDEX": "3", "NCCL_SOCKET_IFNAME": "eth0"}
    line = nccl_transport(4, env, ib, net, verbs="libibverbs.so.1")[-1]
    assert "RoCE verbs" in line and "on mlx5_2:1 " in line and "mlx5_0" not in line
    assert "RoCE GID index 3" in line and "bootstrap over eth0" in line
    assert "NCCL picks it" in nccl_transport(4, {}, ib, net, verbs="libibverbs.so.1")[-1]


def test_sockets_and_why(tmp_path):
    ib, net = _machine(tmp_path, {"mlx5_0:1": ("4: ACTIVE", "InfiniBand")}, ifaces=("lo", "eth0", "docker0"))
    no_verbs = nccl_transport(2, {}, ib, net, verbs=None)[-1]
    assert "TCP sockets on eth0 " in no_verbs and "libibverbs is not installed" in no_verbs
    excluded = nccl_transport(2, {"NCCL_IB_HCA": "^mlx5_0"}, ib, net, verbs="libibverbs.so.1")[-1]
    assert "TCP sockets" in excluded and "no RDMA device admitted by NCCL_IB_HCA=^mlx5_0" in excluded
    off = nccl_transport(2, {"NCCL_IB_DISABLE": "1"}, ib, net, verbs="libibverbs.so.1")[-1]
    assert "TCP sockets" in off and "IB is off" in off
    empty = tmp_path / "none"
    down = nccl_transport(2, {"NCCL_NET": "IB"}, empty, net, verbs="libibverbs.so.1")[-1]
    assert "NCCL_NET=IB but no RDMA device" in down and "fail" in down
    assert "none (one node" in nccl_transport(1, {}, ib, net, verbs=None)[-1]


def test_nccl_name_rules(tmp_path):
    ib, net = _machine(tmp_path, {"mlx5_0:1": ("4: ACTIVE", "InfiniBand"), "mlx5_10:1": ("4: ACTIVE", "InfiniBand"),
                                  "mlx5_1:2": ("4: ACTIVE", "InfiniBand")})
    assert [p[0] for p in rdma_ports(ib, "mlx5_1")] == ["mlx5_1", "mlx5_10"]  # prefixes
    assert [p[0] for p in rdma_ports(ib, "=mlx5_1")] == ["mlx5_1"]  # exact
    assert rdma_ports(ib, "=mlx5_1:1") == [] and len(rdma_ports(ib, "=mlx5_1:2")) == 1  # ports
    assert socket_interfaces(net, "^lo,docker") == ["eth0", "ib0"] and socket_interfaces(net, "=eth0") == ["eth0"]
    assert socket_interfaces(net) == ["ib0"]
