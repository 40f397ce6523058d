"""Atomic DCP checkpoints: round trip, keep-k, newest-first scan past damaged saves (sizes AND sha256), async saves
that snapshot the state, clear errors, safe metadata."""
import pickle

from pathlib import Path

import pytest
import torch

from lctrain.checkpoint.state import Shards
from lctrain.checkpoint.store import (LATEST, Checkpointer, CheckpointError, SafeFileSystemReader, find_latest,
                                      list_checkpoints, load_state, load_tensors, read_meta, save_checkpoint,
                                      scan_latest, stored_tensors)


def _state():
    return {"model/w": torch.randn(5, 7), "optim/w/exp_avg": torch.randn(5, 7, dtype=torch.float64),
            "optim/step": torch.tensor(3), "rng/rank0/cpu": torch.get_rng_state()}


def test_round_trip_and_keep(tmp_path):
    states = {}
    for step in (2, 4, 6):
        states[step] = _state()
        save_checkpoint(tmp_path, step, states[step], {"position": 8 * step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006", "step_00000004"]
    assert (tmp_path / LATEST).read_text().strip() == "step_00000006"
    latest = find_latest(tmp_path)
    meta = read_meta(latest)
    assert meta["step"] == 6 and meta["position"] == 48 and set(meta["files"]) >= {".metadata"}
    assert all(len(f["sha256"]) == 64 for f in meta["files"].values())
    assert not list(latest.glob(".sha256-*")) and not list(tmp_path.glob(".tmp-*"))
    shapes = stored_tensors(latest)
    assert shapes["optim/w/exp_avg"] == (torch.Size([5, 7]), torch.float64)
    got = load_tensors(latest, list(states[6]))
    for k, v in states[6].items():
        assert torch.equal(got[k], v) and got[k].dtype == v.dtype, k


def test_scan_skips_incomplete_and_corrupt(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, _state(), {"position": step}, keep=5)
    (tmp_path / "step_00000003" / "meta.json").unlink()  # a save that never finished
    shard = next((tmp_path / "step_00000002").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])  # truncated
    (tmp_path / "step_00000009").mkdir()  # an empty directory
    assert find_latest(tmp_path) == tmp_path / "step_00000001"
    path, skipped = scan_latest(tmp_path)
    # step_00000009 is no checkpoint of the lineage (`lineage` lists 3, 2, 1): not a candidate at all
    assert path == tmp_path / "step_00000001" and [p.name for p, _ in skipped] == ["step_00000003", "step_00000002"]
    (tmp_path / "lineage").unlink()
    (tmp_path / "latest").unlink()
    assert [p.name for p, _ in scan_latest(tmp_path)[1]] == ["step_00000009", "step_00000003", "step_00000002"]
    with pytest.raises(CheckpointError, match="step_00000003.*incomplete"):
        read_meta(tmp_path / "step_00000003")
    with pytest.raises(CheckpointError, match="step_00000002.*corrupt"):
        read_meta(tmp_path / "step_00000002")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_meta(tmp_path / "nope")
    assert find_latest(tmp_path / "nothing-here") is None


def test_missing_tensor_and_garbage_metadata(tmp_path):
    save_checkpoint(tmp_path, 1, _state(), {}, keep=1)
    path = find_latest(tmp_path)
    with pytest.raises(CheckpointError, match="lacks 1 tensor"):
        load_tensors(path, ["model/w", "model/other"])
    md = path / ".metadata"
    md.write_bytes(b"x" * md.stat().st_size)
    with pytest.raises(CheckpointError, match="cannot read its DCP metadata"):
        stored_tensors(path)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_metadata_unpickler_refuses_foreign_objects(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()


def test_same_size_corruption_is_caught_by_the_checksum(tmp_path):
    save_checkpoint(tmp_path, 1, _state(), {}, keep=2)
    save_checkpoint(tmp_path, 2, _state(), {}, keep=2)
    shard = next((tmp_path / "step_00000002").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern, same size
    shard.write_bytes(bytes(data))
    read_meta(tmp_path / "step_00000002", verify=False)  # sizes alone cannot tell
    with pytest.raises(CheckpointError, match="sha256 of __0_0.distcp does not match"):
        read_meta(tmp_path / "step_00000002")
    assert find_latest(tmp_path) == tmp_path / "step_00000001"


def test_async_save_snapshots_the_state_and_round_trips_shards(tmp_path):
    w = torch.randn(6, 4)
    state = {"model/w": Shards((6, 4), torch.float32, [((0, 0), w[:2]), ((2, 0), w[2:])]), "optim/step": torch.tensor(5)}
    expect = w.clone()
    ckpt = Checkpointer(tmp_path, keep=2, async_save=True)
    final = ckpt.save(5, state, {"position": 1})
    w.add_(1.0)  # training goes on while the checkpoint is written
    assert ckpt.wait() == final and read_meta(final)["step"] == 5
    staged = ckpt.stager.allocated_bytes
    buffers = {k: b.data_ptr() for k, b in ckpt.stager.buffers.items()}
    assert staged == 6 * 4 * 4 + 8  # this rank's boxes and the step count, once
    second = ckpt.save(6, state, {"position": 2})  # the next save reuses the staging buffers: no new allocation
    w.add_(1.0)
    ckpt.close()
    assert ckpt.stager.allocated_bytes == staged
    assert {k: b.data_ptr() for k, b in ckpt.stager.buffers.items()} == buffers
    for path, want in ((final, expect), (second, expect + 1.0)):
        out = torch.zeros(6, 4)
        load_state(path, {"model/w": Shards((6, 4), torch.float32, [((0, 0), out[:3]), ((3, 0), out[3:])])})
        assert torch.equal(out, want)


def test_rewind_starts_a_branch_and_auto_follows_it(tmp_path):
    """Save 3, 6, 9, 12; rewind to 6 and save 9: "auto" resumes the new 9, never the abandoned 12 (kept)."""
    ck = Checkpointer(tmp_path, keep=10)
    for step in (3, 6, 9, 12):
        ck.save(step, _state(), {"position": step})
    rewound = Checkpointer(tmp_path, keep=10)
    rewound.continue_from(tmp_path / "step_00000006")
    new9 = rewound.save(9, _state(), {"position": 9})
    assert new9.name == "step_00000009-b1" and (tmp_path / "step_00000012").is_dir()
    assert (tmp_path / "step_00000009").is_dir()  # the old branch's 9 is not overwritten
    assert find_latest(tmp_path) == new9 and read_meta(new9)["parent"] == "step_00000006"
    assert (tmp_path / "lineage").read_text().split() == ["step_00000009-b1", "step_00000006", "step_00000003"]
    # the head corrupt (same size): the lineage falls back to 6, not to the other branch's 12 or 9
    shard = next(new9.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-50] ^= 1
    shard.write_bytes(bytes(data))
    path, skipped = scan_latest(tmp_path)
    assert path == tmp_path / "step_00000006" and [p.name for p, _ in skipped] == ["step_00000009-b1"]
    # continuing the head keeps the branch
    again = Checkpointer(tmp_path, keep=10)
    again.continue_from(path)
    assert again.branch == 2  # 6 is no longer the head (9-b1 is): a second rewind, a second branch
    head = Checkpointer(tmp_path, keep=10)
    head.continue_from(new9)
    assert head.branch == 1 and head.save(10, _state(), {}).name == "step_00000010-b1"


def test_corrupt_checkpoints_do_not_count_toward_keep(tmp_path):
    from lctrain.checkpoint.store import mark_corrupt

    ck = Checkpointer(tmp_path, keep=2)
    ck.save(1, _state(), {})
    ck.save(2, _state(), {})
    mark_corrupt(tmp_path / "step_00000002", "test: found corrupt on resume")
    ck.save(3, _state(), {})
    # keep=2 complete ones: 3 and 1 (2 is corrupt and does not push 1 out)
    assert {p.name for p in list_checkpoints(tmp_path)} == {"step_00000001", "step_00000002", "step_00000003"}
    ck.save(4, _state(), {})
    assert not (tmp_path / "step_00000001").exists() and (tmp_path / "step_00000003").is_dir()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_file_is_verified_by_exactly_one_rank(world):
    from lctrain.checkpoint.store import assigned_files

    meta = {"files": {".metadata": {}, **{f"__{k}_0.distcp": {} for k in range(4)}}}
    shares = [assigned_files(meta, r, world) for r in range(world)]
    flat = [n for share in shares for n in share]
    assert sorted(flat) == sorted(meta["files"]) and len(flat) == len(set(flat))
    assert max(sum(n.endswith(".distcp") for n in share) for share in shares) == -(-4 // world)


def test_shards_are_hashed_while_written_not_reread(tmp_path, monkeypatch):
    from lctrain.checkpoint import store

    hashed = []
    real = store.file_sha256
    monkeypatch.setattr(store, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    path = save_checkpoint(tmp_path, 1, _state(), {}, keep=1)
    assert hashed == [".metadata"]  # the shard's digest came from the write stream
    monkeypatch.setattr(store, "file_sha256", real)
    read_meta(path, verify=True)  # and it is the file's real sha256
