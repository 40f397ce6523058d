"""Atomic DCP checkpoints: round trip, keep-k, newest-first scan past damaged saves, clear errors, safe metadata."""
import pickle

import pytest
import torch

from lctrain.checkpoint.store import (LATEST, CheckpointError, SafeFileSystemReader, find_latest, list_checkpoints,
                                      load_tensors, read_meta, save_checkpoint, stored_tensors)


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
