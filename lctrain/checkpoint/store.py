"""Atomic, sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout of a run's `checkpoints/` directory:

    step_00000006/      DCP shards (`__R_0.distcp`, one or more per rank) + `.metadata` + `meta.json`
    latest              name of the newest complete checkpoint (written last)
    .tmp-step_.../      a save in progress (never read; removed by the next save)

A save writes everything into a temporary directory; when every rank has finished its shards, rank 0
writes `meta.json` (step, data position, layout, config, and the size of every file), renames the
directory to its final name and only then rewrites `latest`. A checkpoint is complete when its
`meta.json` parses and every file it lists has the listed size, so a save killed at any point leaves the
previous checkpoint as the newest complete one. Loading never unpickles arbitrary objects: tensors go
through DCP's weights-only path and DCP's pickled `.metadata` through an unpickler that only admits
DCP's own metadata classes and torch dtypes.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from lctrain.parallel import comm

FORMAT = "lctrain-ckpt-v1"
META = "meta.json"
LATEST = "latest"
PREFIX = "step_"
#: test hook: every rank SIGKILLs itself after writing its shards of this step's save, before the rename.
KILL_ENV = "LCTRAIN_KILL_DURING_SAVE"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupt (the message names the path)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata dataclasses, torch dtypes/Size, paths and plain containers; nothing else."""

    _BUILTINS = {"set", "frozenset", "slice", "tuple", "list", "dict", "int", "float", "str", "bytes", "bool"}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") and not name.startswith("__"):
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                                (torch.dtype, torch.layout, torch.memory_format))):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":
            return super().find_class(module, name)
        if module == "builtins" and name in self._BUILTINS:
            return super().find_class(module, name)
        if (module, name) in (("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                              ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the restricted unpickler for `.metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} does not hold DCP metadata")
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


def _rank() -> int:
    return dist.get_rank() if comm.is_distributed() else 0


def _step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def read_meta(path: str | Path) -> dict:
    """`meta.json` of a complete checkpoint; CheckpointError naming `path` if it is missing or damaged."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    f = path / META
    if not f.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: no {META} (the save did not finish)")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {META} does not parse ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r}: unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    for name, size in meta.get("files", {}).items():
        g = path / name
        if not g.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: file {name} is missing")
        if g.stat().st_size != size:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {name} has {g.stat().st_size} bytes, "
                                  f"{size} expected")
    return meta


def list_checkpoints(root: str | Path) -> list[Path]:
    """Every `step_*` directory under `root`, newest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=_step_of, reverse=True)


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (scanning newest-first, skipping damaged ones), or None."""
    for path in list_checkpoints(root):
        try:
            read_meta(path)
        except CheckpointError:
            continue
        return path
    return None


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict, keep: int) -> Path:
    """Write `tensors` (DCP; a key held by several ranks is written once) and `meta` atomically.

    Collective: every rank calls it with its own `tensors` (replicated keys must be equal on all ranks).

    Args:
        root: the run's checkpoints directory.
        step: the optimizer step the state is after.
        tensors: flat name -> tensor state of this rank.
        meta: JSON-able metadata (step, data position, layout, config ...), stored in meta.json.
        keep: how many complete checkpoints to keep (older ones are deleted).
    Returns:
        The final checkpoint directory.
    """
    root = Path(root)
    name = f"{PREFIX}{step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    comm.barrier()
    dcp.save(tensors, storage_writer=FileSystemWriter(str(tmp), sync_files=True))
    if os.environ.get(KILL_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    comm.barrier()
    if _rank() == 0:
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        body = dict(meta, format=FORMAT, step=step, saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    files=files)
        _write_atomic(tmp / META, json.dumps(body, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _write_atomic(root / LATEST, name + "\n")
        complete = [p for p in list_checkpoints(root) if (p / META).is_file()]
        for old in complete[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def stored_tensors(path: str | Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in the checkpoint at `path` (reads only the metadata)."""
    try:
        md = SafeFileSystemReader(str(path)).read_metadata()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: cannot read its DCP metadata ({err})") from err
    return {k: (v.size, v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def load_tensors(path: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read the full tensors `names` from the checkpoint at `path` (collective when distributed).

    Raises:
        CheckpointError: naming `path`, when a name is absent or a shard is unreadable.
    """
    available = stored_tensors(path)
    missing = [n for n in names if n not in available]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {len(missing)} tensor(s), e.g. {missing[:3]} "
                              "(saved from a different model?)")
    out = {n: torch.empty(available[n][0], dtype=available[n][1]) for n in names}
    try:
        dcp.load(out, storage_reader=SafeFileSystemReader(str(path)))
    except Exception as err:  # noqa: BLE001 - DCP raises assorted types (CheckpointException, RuntimeError ...)
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: reading its shards failed ({err})") from err
    return out
