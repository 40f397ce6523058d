"""The time model's pieces: ring collective formulas, which groups cross nodes, ZeRO state bytes, device tables."""
from __future__ import annotations

import pytest

from lctrain.plan.hardware import HARDWARE, get_hardware
from lctrain.plan.timemodel import Link, collective_time, group_spans_nodes, zero_state_bytes

LINK = Link(bytes_per_s=100e9, latency_s=1e-5, inter_node=False)


def test_ring_collective_formulas():
    b, n = 8e9, 8
    assert collective_time("all_gather", b, n, LINK) == pytest.approx(7 * (1e-5 + b / 100e9))
    assert collective_time("reduce_scatter", b, n, LINK) == pytest.approx(7 * (1e-5 + b / 8 / 100e9))
    assert collective_time("all_reduce", b, n, LINK) == pytest.approx(2 * collective_time("reduce_scatter", b, n, LINK))
    assert collective_time("all_to_all", b, n, LINK) == pytest.approx(7e-5 + 7 / 8 * b / 100e9)
    assert collective_time("send", b, 2, LINK) == pytest.approx(1e-5 + b / 100e9)
    assert collective_time("recv", b, 2, LINK) == 0.0
    assert collective_time("all_reduce", b, 1, LINK) == 0.0
    with pytest.raises(ValueError, match="no time model"):
        collective_time("gossip", b, n, LINK)


@pytest.mark.parametrize("group,tp,cp,dp,spans", [
    ("tp", 8, 1, 8, False), ("tp", 16, 1, 4, True), ("cp", 2, 4, 8, False), ("cp", 2, 8, 4, True),
    ("cp", 1, 8, 8, False), ("dpcp", 1, 8, 1, False), ("dpcp", 1, 8, 2, True),
])
def test_groups_crossing_nodes_follow_megatron_rank_order(group, tp, cp, dp, spans):
    assert group_spans_nodes(group, tp, cp, dp, gpus_per_node=8) is spans


def test_zero_states_follow_the_zero_paper():
    psi, n = 1e9, 8
    assert zero_state_bytes(psi, 0, n) == 16 * psi
    assert zero_state_bytes(psi, 1, n) == pytest.approx(4 * psi + 12 * psi / n)
    assert zero_state_bytes(psi, 2, n) == pytest.approx(2 * psi + 14 * psi / n)
    assert zero_state_bytes(psi, 3, n) == pytest.approx(16 * psi / n)


def test_every_device_table_cites_its_sources():
    for key, hw in HARDWARE.items():
        assert hw.sources and hw.peak_bf16_flops > 0 and hw.memory_gb > 0, key
        assert set(hw.efficiency) >= {"matmul", "attention", "linear_attention", "memory", "intra_link",
                                      "inter_link"}, key
        assert all(0 < e <= 1 for e in hw.efficiency.values()), key
    with pytest.raises(ValueError, match="unknown hardware 'x'"):
        get_hardware("x")
