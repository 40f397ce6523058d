"""Atomic, sharded, checksummed checkpoints with torch.distributed.checkpoint (DCP), synchronous or asynchronous.

Layout of a run's `checkpoints/` directory:

    step_00000006/      DCP shards (`__<rank>_0.distcp`, one per rank) + `.metadata` + `meta.json`
    latest              name of the newest complete checkpoint (written last)
    .tmp-step_.../      a save in progress (never read; removed by the next save)

A save writes everything into a temporary directory. Each rank hashes the shard files it wrote (sha256) into
a sidecar; DCP's coordinator writes `.metadata` only after every rank's shards are written, and then rank 0
writes `meta.json` (step, data position, layout, config, and the size and sha256 of every file: the manifest,
written last), renames the directory to its final name and only then rewrites `latest`. A checkpoint is
complete when its `meta.json` parses and every file it lists has the listed size and sha256, so a save killed
at any point (also an asynchronous one, whose files are written while training goes on) leaves the previous
checkpoint as the newest complete one. Loading never unpickles arbitrary objects: tensors go through DCP's
weights-only path and DCP's pickled `.metadata` through an unpickler that only admits DCP's own metadata
classes and torch dtypes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.staging import AsyncStager

from lctrain.checkpoint.state import Shards, ShardsLoadPlanner, ShardsSavePlanner
from lctrain.parallel import comm

FORMAT = "lctrain-ckpt-v2"
META = "meta.json"
LATEST = "latest"
PREFIX = "step_"
SIDECAR = ".sha256-rank"
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


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in blocks)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_meta(path: str | Path, verify: bool = True) -> dict:
    """`meta.json` of a complete checkpoint; CheckpointError naming `path` if it is missing or damaged.

    Args:
        path: the checkpoint directory.
        verify: also check every listed file's sha256 (reads the whole checkpoint); sizes are always checked.
    """
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
        raise CheckpointError(f"checkpoint {str(path)!r}: unknown format "
                              f"{meta.get('format') if isinstance(meta, dict) else meta!r} ({FORMAT} expected)")
    files = meta.get("files")
    if not isinstance(files, dict) or ".metadata" not in files:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {META} lists no files")
    for name, want in files.items():
        g = path / name
        if not g.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: file {name} is missing")
        if g.stat().st_size != want["size"]:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {name} has {g.stat().st_size} bytes, "
                                  f"{want['size']} expected")
    if verify:
        for name, want in files.items():
            if file_sha256(path / name) != want["sha256"]:
                raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: the sha256 of {name} does not match "
                                      f"its manifest entry")
    return meta


def list_checkpoints(root: str | Path) -> list[Path]:
    """Every `step_*` directory under `root`, newest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=_step_of, reverse=True)


def scan_latest(root: str | Path, verify: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under `root` (or None) and the newer ones skipped, with the reason.

    A directory without meta.json (a save that never finished) is skipped silently as "incomplete"; the
    caller decides how loudly to report the others.
    """
    skipped = []
    for path in list_checkpoints(root):
        try:
            read_meta(path, verify=verify)
        except CheckpointError as err:
            skipped.append((path, str(err)))
            continue
        return path, skipped
    return None, skipped


def find_latest(root: str | Path, verify: bool = True) -> Path | None:
    """The newest complete checkpoint under `root` (scanning newest-first, skipping damaged ones), or None."""
    return scan_latest(root, verify)[0]


class _HashingWriter(FileSystemWriter):
    """DCP's file writer that also records the sha256 of the files this rank wrote (in a sidecar)."""

    def write_data(self, plan, planner) -> Future:
        fut = super().write_data(plan, planner)
        names = sorted({r.storage_data.relative_path for r in fut.wait()})
        root = Path(self.path)
        digests = {n: {"size": (root / n).stat().st_size, "sha256": file_sha256(root / n)} for n in names}
        _write_atomic(root / f"{SIDECAR}{_rank()}.json", json.dumps(digests))
        return fut


class _CloneStager(AsyncStager):
    """Stages a state dict for an asynchronous save: contiguous CPU copies of this rank's boxes and tensors."""

    _synchronize_after_execute = False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {k: v.staged() if isinstance(v, Shards) else v.detach().to("cpu", copy=True)
                for k, v in state_dict.items()}

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


class Checkpointer:
    """Saves one run's checkpoints under `root`, synchronously or (async_save) while training goes on.

    At most one save is in flight: the next save, :meth:`wait` and :meth:`close` wait for it. An
    asynchronous save copies this rank's share to CPU memory (its own shard, nothing more), then DCP writes
    it from a background thread, coordinating over a gloo group of its own so that its collectives never
    interleave with training's; the checkpoint is finalised (manifest, rename, `latest`) only after every
    rank's files are written.

    Args:
        root: the run's checkpoints directory.
        keep: how many complete checkpoints to keep (older ones are deleted).
        async_save: write in the background (dcp.async_save).
    """

    def __init__(self, root: str | Path, keep: int, async_save: bool = False):
        self.root, self.keep, self.async_save = Path(root), keep, async_save
        self.group = dist.new_group(backend="gloo") if async_save and comm.is_distributed() else None
        self._pending: Future | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lctrain-ckpt") if async_save else None
        self.last: Path | None = None
        """The newest checkpoint this object completed."""
        self.wait_s = 0.0
        """Seconds the training thread spent waiting for in-flight saves."""

    def save(self, step: int, state: dict[str, Any], meta: dict) -> Path:
        """Write `state` (DCP state dict: tensors and :class:`Shards`) and `meta` as checkpoint `step`.

        Collective: every rank calls it with its own share. Returns the final directory, complete when this
        returns (synchronous) or once :meth:`wait` returns (asynchronous).
        """
        self.wait()
        name = f"{PREFIX}{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        comm.barrier()
        writer = _HashingWriter(str(tmp), sync_files=True, single_file_per_rank=True)
        if not self.async_save:
            dcp.save(state, storage_writer=writer, planner=ShardsSavePlanner())
            self._after_write(step, tmp, final, meta, barrier=True)
            return final
        fut = dcp.async_save(state, storage_writer=writer, planner=ShardsSavePlanner(), process_group=self.group,
                             async_stager=_CloneStager())
        self._pending = self._executor.submit(self._finish_async, fut, step, tmp, final, meta)
        return final

    def _finish_async(self, fut: Future, step: int, tmp: Path, final: Path, meta: dict) -> Path:
        fut.result()  # on rank 0, DCP returns after every rank's files and .metadata are written
        return self._after_write(step, tmp, final, meta, barrier=False)

    def _after_write(self, step: int, tmp: Path, final: Path, meta: dict, barrier: bool) -> Path:
        if os.environ.get(KILL_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        if barrier:
            comm.barrier()
        if _rank() == 0:
            self._finalize(step, tmp, final, meta)
        if barrier:
            comm.barrier()
        self.last = final
        return final

    def _finalize(self, step: int, tmp: Path, final: Path, meta: dict) -> None:
        files: dict[str, dict] = {}
        for side in sorted(tmp.glob(f"{SIDECAR}*.json")):
            files.update(json.loads(side.read_text()))
            side.unlink()
        for f in tmp.iterdir():
            if f.is_file() and f.name not in files:
                files[f.name] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
        body = dict(meta, format=FORMAT, step=step, saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    files=files)
        _write_atomic(tmp / META, json.dumps(body, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _write_atomic(self.root / LATEST, final.name + "\n")
        complete = [p for p in list_checkpoints(self.root) if (p / META).is_file()]
        for old in complete[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)

    def wait(self) -> Path | None:
        """Wait for the save in flight (if any) to be complete; return the newest completed checkpoint."""
        if self._pending is not None:
            t0 = time.perf_counter()
            try:
                self._pending.result()
            finally:
                self._pending = None
                self.wait_s += time.perf_counter() - t0
        return self.last

    def close(self) -> None:
        """Wait for the save in flight and release the background thread and process group."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self.group is not None:
                dist.destroy_process_group(self.group)
                self.group = None


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, Any], meta: dict, keep: int) -> Path:
    """Write `tensors` (DCP; a key held by several ranks is written once) and `meta` atomically, synchronously.

    Collective: every rank calls it with its own `tensors` (replicated keys must be equal on all ranks).

    Args:
        root: the run's checkpoints directory.
        step: the optimizer step the state is after.
        tensors: flat name -> tensor (or :class:`Shards`) state of this rank.
        meta: JSON-able metadata (step, data position, layout, config ...), stored in meta.json.
        keep: how many complete checkpoints to keep (older ones are deleted).
    Returns:
        The final checkpoint directory.
    """
    return Checkpointer(root, keep).save(step, tensors, meta)


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


def load_state(path: str | Path, state: dict[str, Any]) -> None:
    """Fill `state` (tensors and :class:`Shards` destinations) from the checkpoint at `path`, resharding.

    Collective when distributed. Every rank reads only the boxes that overlap its destinations.

    Raises:
        CheckpointError: naming `path`, when a name is absent, a shape differs, or a shard is unreadable.
    """
    available = stored_tensors(path)
    missing = [n for n in state if n not in available]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {len(missing)} tensor(s), e.g. {missing[:3]} "
                              "(saved from a different model?)")
    for n, v in state.items():
        if tuple(available[n][0]) != tuple(v.size()):
            raise CheckpointError(f"checkpoint {str(path)!r}: {n} has shape {tuple(available[n][0])}, this model "
                                  f"needs {tuple(v.size())} (a different model config?)")
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=ShardsLoadPlanner())
    except Exception as err:  # noqa: BLE001 - DCP raises assorted types (CheckpointException, RuntimeError ...)
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: reading its shards failed ({err})") from err


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
    load_state(path, out)
    return out
