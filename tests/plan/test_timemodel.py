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


# ----------------------------------------------------------------------------- estimate_step, by hand
from lctrain.models.config import ModelConfig  # noqa: E402
from lctrain.plan.hardware import Hardware  # noqa: E402
from lctrain.plan.simulate import CommStat, RankSim, SimSpec  # noqa: E402
from lctrain.plan.timemodel import Job, estimate_step  # noqa: E402

#: Round numbers: bf16 1 PFLOP/s, fp32 0.1 PFLOP/s, HBM 1 TB/s, NVLink 100 GB/s, every efficiency 0.5.
HW = Hardware(name="round", memory_gb=10.0, peak_bf16_flops=1e15, hbm_bytes_per_s=1e12,
              intra_node_bytes_per_s=1e11, inter_node_bytes_per_s=1e10, intra_node_latency_s=1e-5,
              inter_node_latency_s=1e-4, efficiency={k: 0.5 for k in ("matmul", "attention", "linear_attention",
                                                                      "memory", "intra_link", "inter_link")},
              peak_flops={"bf16": 1e15, "fp32": 1e14}, memory_reserve_gb=1.0, fragmentation=0.1)
W = 1e11 * 0.5  # link bytes/s after the bus efficiency


def _sim(comm, layers=2, pattern="L", linear_sp="lasp2", layout="zigzag", seq=4096, cp=4) -> RankSim:
    model = ModelConfig(num_layers=layers, layer_pattern=pattern, linear_sp=linear_sp)
    spec = SimSpec(model, tp=1, cp=cp, cp_layout=layout, seq_len=seq, micro_batch=1)
    return RankSim(spec=spec, world=cp, params_local=int(1e8), params_tp_replicated=0, param_bytes=int(2e8),
                   activation_peak_bytes=int(1e9), activation_after_forward_bytes=0,
                   flops={"matmul": 3e12, "linear_attention": 1e11}, memory_bound_bytes=1e10, comm=comm,
                   sim_seconds=0.0,
                   flops_detail={"L|matmul|bf16": 1e12, "L|linear_attention|fp32": 1e11, "MLP|matmul|bf16": 2e12},
                   bytes_detail={"L|elementwise|": 1e10})


def test_estimate_step_by_hand():
    comm = [CommStat("cp", "all_gather", "lasp2.fwd", 4, calls=2, bytes=int(2e6)),
            CommStat("cp", "all_gather", "lasp2.bwd", 4, calls=1, bytes=int(2e8))]
    est = estimate_step(_sim(comm), HW, dp=2, zero_stage=1, gpus_per_node=8)
    # Compute: matmul 3e12 / (1e15 x 0.5) = 6 ms; fp32 linear attention at the fp32 rate 1e11 / (1e14 x 0.5)
    # = 2 ms (not 0.2 ms at the bf16 rate); memory-bound 1e10 / (1e12 x 0.5) = 20 ms.
    assert est.compute_by_class_s == pytest.approx({"matmul": 6e-3, "linear_attention": 2e-3, "memory": 2e-2})
    assert est.compute_by_scope_s == pytest.approx({"L": 2e-3 + 2e-3 + 2e-2, "MLP": 4e-3})
    # LASP-2 forward: 2 all-gathers of 1 MB over 4 ranks, 3 (1e-5 + 1e6 / W) each = 0.18 ms, hidden behind the
    # forward third of the linear attention (0.67 ms). Backward: one of 200 MB, 3 (1e-5 + 4e-3) = 12.03 ms,
    # hidden behind 2/3 of 2 ms.
    fwd, bwd = 2 * 3 * (1e-5 + 1e6 / W), 3 * (1e-5 + 2e8 / W)
    assert est.comm_exposed_by_kind_s["lasp2.fwd"] == 0.0
    assert est.comm_exposed_by_kind_s["lasp2.bwd"] == pytest.approx(bwd - 2 / 3 * 2e-3)
    # ZeRO-1 over DP x CP = 8 ranks inside a node: one all-reduce of 2 x 1e8 bytes, exposed.
    zero = 2 * 7 * (1e-5 + 2e8 / (8 * W))
    assert est.comm_exposed_by_kind_s["dp.zero"] == pytest.approx(zero)
    assert est.comm_total_s == pytest.approx(fwd + bwd + zero)
    optimizer = 36 * 1e8 / 8 / (1e12 * 0.5)
    step = 0.028 + (bwd - 2 / 3 * 2e-3) + zero + optimizer
    assert est.step_s == pytest.approx(step)
    assert est.tokens_per_step == 2 * 4096 and est.tokens_per_s == pytest.approx(2 * 4096 / step)
    # Memory: ZeRO-1 states 4 psi + 12 psi / 8, activations 1 GB, margin 10% of them + 1 GB reserve.
    assert est.mem_states_bytes == pytest.approx(4e8 + 12e8 / 8)
    assert est.mem_margin_bytes == pytest.approx(0.1e9 + 1e9)
    assert est.mem_total_bytes == pytest.approx(5.5e8 + 1e9 + 1.1e9)
    # Gradient accumulation: 2 micro-batches per DP rank, one reduction and one optimizer step.
    acc = estimate_step(_sim(comm), HW, dp=2, zero_stage=1, gpus_per_node=8, job=Job(global_batch=4))
    assert acc.accumulation == 2
    assert acc.step_s == pytest.approx(2 * (0.028 + bwd - 2 / 3 * 2e-3) + zero + optimizer)
    with pytest.raises(ValueError, match="not a positive multiple"):
        estimate_step(_sim(comm), HW, dp=2, zero_stage=1, gpus_per_node=8, job=Job(global_batch=3))


def test_oom_margin_makes_a_nearly_full_device_infeasible():
    sim = _sim([])
    est = estimate_step(sim, HW, dp=2, zero_stage=1, gpus_per_node=8)
    raw = est.mem_states_bytes + est.mem_activation_bytes
    tight = Hardware(**{**HW.__dict__, "memory_gb": raw / 1e9 * 1.001})  # fits only without the margin
    assert estimate_step(sim, tight, dp=2, zero_stage=1, gpus_per_node=8).oom


def test_zero3_pays_for_its_extra_gathers():
    """1e8 parameters in 2 layers of 5e7 = DeepSpeed's prefetch window: only the first layer of each direction
    waits for its gather, and the last layer's gradient reduce-scatter comes after backward."""
    sim = _sim([])
    z1 = estimate_step(sim, HW, dp=2, zero_stage=1, gpus_per_node=8)
    z3 = estimate_step(sim, HW, dp=2, zero_stage=3, gpus_per_node=8)
    gather, scatter = 7 * (1e-5 + 2e8 / 8 / W), 7 * (1e-5 + 2e8 / (8 * W))
    assert z3.comm_total_by_kind_s["dp.zero"] == pytest.approx(2 * gather + scatter)
    assert z3.comm_exposed_by_kind_s["dp.zero"] == pytest.approx(2 * gather / 2 + scatter / 2)
    assert z3.mem_states_bytes < z1.mem_states_bytes
    # One layer twice the window: half of each gather waits in front of it, the other half is the first layer's.
    big = _sim([], layers=1)
    z3_big = estimate_step(big, HW, dp=2, zero_stage=3, gpus_per_node=8)
    assert z3_big.comm_exposed_by_kind_s["dp.zero"] == pytest.approx(2 * gather + scatter)
    assert z3_big.step_s > estimate_step(big, HW, dp=2, zero_stage=1, gpus_per_node=8).step_s
    # With accumulation ZeRO-3 pays every micro-batch, ZeRO-1 once per step.
    job = Job(global_batch=8)
    assert (estimate_step(sim, HW, dp=2, zero_stage=3, gpus_per_node=8, job=job).step_s
            > estimate_step(sim, HW, dp=2, zero_stage=1, gpus_per_node=8, job=job).step_s)


def test_lasp1_chain_is_a_critical_path_of_hops_and_their_work():
    """CP = 4, contiguous, 2 LASP-1 layers and no other CP collective: one segment per direction, 3 hops each.
    A hop = send of the state + the work it waits for (forward: a state add; backward: the recomputed state
    and its gradient, 6 C (b h dk dv) FLOPs at the fp32 rate)."""
    state = 4 * 4 * 16 * 16 * 4  # float32 [b=1, h=4, 16, 16]: 16 KiB
    comm = [CommStat("cp", "send", "lasp1.fwd", 4, calls=2, bytes=2 * state),
            CommStat("cp", "recv", "lasp1.fwd", 4, calls=2, bytes=2 * state),
            CommStat("cp", "send", "lasp1.bwd", 4, calls=2, bytes=2 * state),
            CommStat("cp", "recv", "lasp1.bwd", 4, calls=2, bytes=2 * state)]
    sim = _sim(comm, linear_sp="lasp1", layout="contiguous")
    est = estimate_step(sim, HW, dp=2, zero_stage=1, gpus_per_node=8)
    send = 1e-5 + state / W
    fwd_hop = send + 3 * state / (1e12 * 0.5)
    bwd_hop = send + 6 * (4096 // 4) * (state / 4) / (1e14 * 0.5)
    assert est.comm_exposed_by_kind_s["lasp1.fwd"] == pytest.approx(3 * fwd_hop)
    assert est.comm_exposed_by_kind_s["lasp1.bwd"] == pytest.approx(3 * bwd_hop)
    # An all-gather between the two layers (e.g. a softmax layer) synchronises the group: two segments.
    synced = comm + [CommStat("cp", "all_gather", "allgather.fwd", 4, calls=1, bytes=1000)]
    est2 = estimate_step(_sim(synced, linear_sp="lasp1", layout="contiguous"), HW, dp=2, zero_stage=1,
                         gpus_per_node=8)
    assert est2.comm_exposed_by_kind_s["lasp1.fwd"] == pytest.approx(2 * 3 * fwd_hop)
    assert est2.comm_exposed_by_kind_s["lasp1.bwd"] == pytest.approx(3 * bwd_hop)
    # ZeRO-3 gathers parameters every layer over DP x CP: every layer is its own segment.
    z3 = estimate_step(sim, HW, dp=2, zero_stage=3, gpus_per_node=8)
    assert z3.comm_exposed_by_kind_s["lasp1.bwd"] == pytest.approx(2 * 3 * bwd_hop)
    # Checkpointing: the 2 layers re-run their forward chain in backward (4 forward sends: 2 + 2 recomputed),
    # against the backward chain's direction: each recomputed layer pays both chains.
    recomputed = [CommStat("cp", "send", "lasp1.fwd", 4, calls=4, bytes=4 * state)] + comm[2:]
    ck = estimate_step(_sim(recomputed, linear_sp="lasp1", layout="contiguous"), HW, dp=2, zero_stage=1,
                       gpus_per_node=8)
    assert ck.comm_exposed_by_kind_s["lasp1.fwd"] == pytest.approx((1 + 2) * 3 * fwd_hop)
    assert ck.comm_exposed_by_kind_s["lasp1.bwd"] == pytest.approx(2 * 3 * bwd_hop)


def test_packed_documents_shrink_model_flops_and_skipping_kernels():
    assert Job(doc_len=1024).attention_factor(4096) == pytest.approx(4 * 1024 * 1025 / 2 / (4096 * 4097 / 2))
    assert Job().attention_factor(4096) == 1.0 and Job(doc_len=8192).attention_factor(4096) == 1.0
    model = ModelConfig(num_layers=1, layer_pattern="A", hidden_size=64, num_heads=4, num_kv_heads=4)
    spec = SimSpec(model, tp=1, cp=1, seq_len=4096)
    sim = RankSim(spec=spec, world=1, params_local=1000, params_tp_replicated=0, param_bytes=2000,
                  activation_peak_bytes=0, activation_after_forward_bytes=0, flops={"attention": 1e12},
                  memory_bound_bytes=0.0, comm=[], sim_seconds=0.0, flops_detail={"A|attention|bf16": 1e12})
    full = estimate_step(sim, HW, dp=1, zero_stage=0, gpus_per_node=8)
    packed = estimate_step(sim, HW, dp=1, zero_stage=0, gpus_per_node=8, job=Job(doc_len=1024))
    f = Job(doc_len=1024).attention_factor(4096)
    assert packed.compute_by_class_s["attention"] == pytest.approx(f * full.compute_by_class_s["attention"])


def test_tree_scan_rounds_follow_their_rule():
    """LASP-2's tree scan: the delta rule's forward rounds are exposed (its local pass needs the entering state);
    linear / gated layers' forward rounds and every backward round run behind the phase's linear attention."""
    from lctrain.plan.timemodel import rule_key

    assert rule_key("lasp2.bwd.round1") == ("lasp2_tree", "bwd") and rule_key("lasp2.fwd") == ("lasp2", "fwd")
    comm = [CommStat("cp", "send", "lasp2_delta.fwd.round0", 4, calls=2, bytes=int(2e6)),
            CommStat("cp", "send", "lasp2_delta.bwd.round0", 4, calls=2, bytes=int(2e6)),
            CommStat("cp", "send", "lasp2.fwd.round0", 4, calls=2, bytes=int(2e6))]
    est = estimate_step(_sim(comm), HW, dp=2, zero_stage=1, gpus_per_node=8)
    send = 2 * (1e-5 + 1e6 / W)
    assert est.comm_exposed_by_kind_s["lasp2_delta.fwd.round0"] == pytest.approx(send)
    assert est.comm_exposed_by_kind_s["lasp2_delta.bwd.round0"] == 0.0  # behind 2/3 of 2 ms
    assert est.comm_exposed_by_kind_s["lasp2.fwd.round0"] == 0.0  # behind 1/3 of 2 ms
