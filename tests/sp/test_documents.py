"""lctrain.sp.documents: the per-batch packed-document tables equal a token-by-token definition, built on the host
(one copy) or derived on the device with no syncing op; bad boundaries and mismatched calls raise ValueError."""
from __future__ import annotations

import pytest
import torch

from lctrain.parallel.sharding import shard_positions
from lctrain.sp.documents import PackedDocuments, as_documents
from lctrain.testing.hot_path import count_syncing_ops


def _definition(bounds, batch, seq_len, rank, world, layout):
    """Per token, by scanning the boundaries: (doc id, position in doc, first?, last?) of rank's tokens."""
    pos = shard_positions(seq_len, rank, world, layout if world > 1 else "contiguous").tolist()
    rows = []
    for r in range(batch):
        row = []
        for p in pos:
            f = r * seq_len + p
            j = max(i for i in range(len(bounds) - 1) if bounds[i] <= f)
            row.append((j, f - bounds[j], f == bounds[j], f == bounds[j + 1] - 1))
        rows.append(row)
    return rows


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_tables_match_the_definition_from_host_and_on_device(world, dtype):
    gen = torch.Generator().manual_seed(world)
    b, s = 2, 8 * world
    for layout in ("zigzag", "contiguous"):
        cuts = {0, s, 2 * s, s + 1} | {int(x) for x in torch.randint(1, 2 * s, (4,), generator=gen)}
        bounds = sorted(cuts)
        cu = torch.tensor(bounds, dtype=dtype)
        for rank in range(world):
            host = PackedDocuments.from_host(cu, b, s, rank, world, layout, "cpu")
            with count_syncing_ops() as ops:
                dev = PackedDocuments.on_device(cu, b, s, rank, world, layout)
            assert ops.calls == []
            want = _definition(bounds, b, s, rank, world, layout)
            for docs in (host, dev):
                got = [list(zip(*(getattr(docs, f)[r].tolist() for f in ("doc_ids", "positions", "starts", "last"))))
                       for r in range(b)]
                assert got == want, (world, layout, rank)
                assert docs.cu_seqlens.dtype == dtype and docs.s_local == s // world
                assert torch.equal(docs.ids_at(shard_positions(s, (rank + 1) % world, world,
                                                               layout if world > 1 else "contiguous")),
                                   PackedDocuments.on_device(cu, b, s, (rank + 1) % world, world, layout).doc_ids)
            assert host.bounds == bounds and dev.bounds is None


def test_from_host_makes_one_host_to_device_copy_and_runs_on_meta():
    cu = torch.tensor([0, 5, 16, 20, 32])
    docs = PackedDocuments.from_host(cu, 2, 16, 1, 2, "zigzag", "meta")  # the rehearsal's device
    assert docs.starts.device.type == "meta" and docs.starts.dtype == torch.bool and docs.last.shape == (2, 8)
    base = docs.doc_ids.untyped_storage()
    # The integer tables are views of the one copied buffer (the flags are compared from it on the device).
    assert all(getattr(docs, f).untyped_storage().nbytes() == base.nbytes()
               for f in ("token_positions", "positions", "cu_seqlens"))


@pytest.mark.parametrize("cu,match", [([0, 5, 31], "from 0 to"), ([0, 5, 5, 32], "strictly increasing"),
                                      ([0, 5, 20, 32], "every sequence end"), ([1, 16, 32], "from 0 to")])
def test_bad_boundaries_raise(cu, match):
    with pytest.raises(ValueError, match=match):
        PackedDocuments.from_host(torch.tensor(cu), 2, 16, 0, 2, "zigzag", "cpu")
    with pytest.raises(ValueError, match="int32/int64"):
        PackedDocuments.from_host(torch.tensor(cu, dtype=torch.float32), 2, 16, 0, 2, "zigzag", "cpu")


def test_a_call_the_tables_were_not_built_for_is_named():
    docs = PackedDocuments.from_host(torch.tensor([0, 7, 16, 32]), 2, 16, 1, 2, "zigzag", "cpu")
    q = torch.zeros(2, 8, 1, 4)
    assert docs.problem(q, 1, 2, "zigzag") is None
    assert "rank 0 of 2" in docs.problem(q, 0, 2, "zigzag")
    assert "'zigzag' layout" in docs.problem(q, 1, 2, "contiguous")
    assert "local tokens" in docs.problem(q[:, :4], 1, 2, "zigzag")
    assert as_documents(docs, q, 1, 2, "zigzag") is docs
    assert torch.equal(as_documents(docs.cu_seqlens, q, 1, 2, "zigzag").starts, docs.starts)


def test_mixers_pass_the_tables_only_to_sp_functions_that_take_them():
    """lctrain's SP methods get the PackedDocuments; any other function with `cu_seqlens=` (a user's, a test's
    stand-in) gets the boundaries tensor, as DESIGN.md specifies."""
    from lctrain import sp
    from lctrain.models.packing import packed_argument, takes_documents

    methods = (sp.ring_attention, sp.allgather_attention, sp.ulysses_attention, sp.lasp2_linear_attention,
               sp.lasp1_linear_attention, sp.lasp2_delta_attention, sp.lasp1_delta_attention)
    assert all(takes_documents(fn) for fn in methods)

    def stand_in(q, k, v, cu_seqlens: torch.Tensor | None = None):
        return q

    docs = PackedDocuments.from_host(torch.tensor([0, 7, 16]), 1, 16, 0, 1, "zigzag", "cpu")
    assert packed_argument(sp.ring_attention, docs) is docs
    assert packed_argument(stand_in, docs) is docs.cu_seqlens
