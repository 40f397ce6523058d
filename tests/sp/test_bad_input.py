"""Bad inputs raise the same clear ValueError on every rank before any collective (no rank hangs)."""
import pytest
import torch
import torch.distributed as dist

from lctrain.parallel import MeshConfig, init_mesh, record_comm
from lctrain.sp import allgather_attention, ring_attention, ulysses_attention
from lctrain.sp.utils import clear_agreement_cache
from lctrain.testing import run_distributed

METHODS = {"ring": ring_attention, "allgather": allgather_attention, "ulysses": ulysses_attention}


def _inputs(case: str, rank: int, world: int):
    """(q, k, v, kwargs) for a named bad case; only some ranks are wrong in the rank-dependent ones."""
    b, s, h, hk, d, dtype = 1, 4, 2 * world, world, 8, torch.float64
    kw = {}
    if case == "seq_differs":
        s = 6 if rank == 1 else 4
    elif case == "dtype_differs":
        dtype = torch.float32 if rank == 0 else torch.float64
    elif case == "odd_zigzag":
        s = 3
    elif case == "heads_not_multiple":
        h, hk = 4, 3
    elif case == "head_dim_on_one_rank":
        pass
    elif case == "ulysses_heads":
        h, hk = 3, 3
    elif case == "ulysses_kv_heads":
        h, hk = 6, 3
    elif case == "layout":
        kw["layout"] = "striped"
    elif case == "causal_differs":
        kw["causal"] = rank == 0
    q = torch.randn(b, s, h, d, dtype=dtype)
    k = torch.randn(b, s, hk, d + (1 if case == "head_dim_on_one_rank" and rank == 1 else 0), dtype=dtype)
    v = torch.randn(k.shape, dtype=dtype)
    return q, k, v, kw


def _raise_everywhere(method: str, cases: list[str]):
    init_mesh(MeshConfig(cp=dist.get_world_size()))
    rank = dist.get_rank()
    out = []
    for case in cases:
        clear_agreement_cache()  # each case is the first call of its signature (see lctrain.sp.utils)
        q, k, v, kw = _inputs(case, rank, dist.get_world_size())
        with record_comm() as rec:
            try:
                METHODS[method](q, k, v, **kw)
                msg = None
            except ValueError as err:
                msg = str(err)
        out.append((case, msg, rec.summary()))
        # The group is still in step: a good call right after works on every rank.
        q = torch.randn(1, 4, dist.get_world_size(), 8, dtype=torch.float64)
        METHODS[method](q, q, q).sum().item()
    return out


EXPECT = {
    "seq_differs": "disagree on q shape",
    "dtype_differs": "disagree on q dtype",
    "odd_zigzag": "even local sequence",
    "heads_not_multiple": "multiple of kv heads",
    "head_dim_on_one_rank": "rank 1 of the CP group",
    "ulysses_heads": "heads divisible by CP",
    "ulysses_kv_heads": "kv heads divisible by CP",
    "layout": "unknown CP layout",
    "causal_differs": "disagree on causal",
}
COMMON = ["seq_differs", "dtype_differs", "odd_zigzag", "heads_not_multiple", "head_dim_on_one_rank", "layout",
          "causal_differs"]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("method", ["ring", "allgather", "ulysses"])
def test_bad_input_raises_same_error_on_every_rank(method, world):
    cases = COMMON + (["ulysses_heads", "ulysses_kv_heads"] if method == "ulysses" and world == 2 else [])
    results = run_distributed(_raise_everywhere, world, method, cases)
    for i, case in enumerate(cases):
        msgs = {r[i][1] for r in results}
        assert len(msgs) == 1, f"{case}: ranks raised different errors {msgs}"
        msg = msgs.pop()
        assert msg is not None and EXPECT[case] in msg and method in msg, f"{case}: {msg}"
        for r in results:
            # Only the agreement exchange ran: no tensor was communicated before the error.
            assert set(r[i][2]) <= {"all_gather_object"}, f"{case}: tensors were communicated before the error: {r[i][2]}"


def test_single_process_errors_are_value_errors():
    q = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ring_attention(q, torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))
    with pytest.raises(ValueError, match="dtypes differ"):
        allgather_attention(q, q.double(), q)
