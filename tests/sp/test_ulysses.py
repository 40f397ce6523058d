"""Ulysses attention equals single-process attention; three all-to-alls forward and three backward."""
import pytest
import torch

from lctrain.testing import run_distributed
from tests.sp.softmax_cases import assert_results, default_cases, run_cases


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ulysses_matches_reference_with_three_all_to_alls_each_way(world):
    seed = int(torch.randint(0, 2**31, ()).item())
    results = run_distributed(run_cases, world, "ulysses", default_cases(world), seed)
    assert_results(results)
    for rank_results in results:
        for r in rank_results:
            if world == 1:
                assert r["fwd"] == {} and r["bwd"] == {}, r["case"]
                continue
            # Q, packed K/V, output forward; their gradients backward.
            assert set(r["fwd"]) == {"all_to_all"} and r["fwd"]["all_to_all"]["calls"] == 3, (r["case"], r["fwd"])
            assert set(r["bwd"]) == {"all_to_all"} and r["bwd"]["all_to_all"]["calls"] == 3, (r["case"], r["bwd"])
            _, _, h, hk, _ = r["case"]
            # K/V cross the wire with kv_heads, or replicated up to CP heads when kv_heads < CP.
            kv_factor = max(world, hk) / hk
            q_bytes = r["kv_bytes"] // 2 * h // hk
            assert r["fwd"]["all_to_all"]["bytes"] == 2 * q_bytes + r["kv_bytes"] * kv_factor, (r["case"], r["fwd"])
