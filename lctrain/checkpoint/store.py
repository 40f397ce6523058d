"""Atomic, sharded, checksummed checkpoints with torch.distributed.checkpoint (DCP), synchronous or asynchronous.

Layout of a run's `checkpoints/` directory:

    step_00000006/      DCP shards (`__<rank>_0.distcp`, one per rank) + `.metadata` + `meta.json`
    step_00000009-b1/   a checkpoint of branch 1 (a run resumed from an older checkpoint: a rewind)
    latest              name of the newest checkpoint of the current lineage (written last)
    lineage             the current lineage, newest first: `latest`, its parent, ... (written with `latest`)
    .tmp-step_.../      a save in progress (never read; removed by the next save)

Lineage: every checkpoint records its parent (the checkpoint its run resumed from, or that run's previous save).
Resuming "auto" follows `lineage` newest-first and never falls over to another branch: train to 12, rewind to 6,
train to 9 resumes from 9 (`step_00000009-b1`), not from the abandoned 12, which is kept until retention
removes it. Retention keeps the `keep` most recently saved complete checkpoints; a checkpoint found corrupt
(marked by a `CORRUPT` file when a resume rejects it) or incomplete never counts toward them.

Verification scales with the world: each rank hashes its shard files while DCP writes them (no re-read), and on
resume rank r verifies only the files assigned to it (:func:`assigned_files`: the shard files of saved ranks
r, r + N, ...), so the work per rank is the checkpoint size / N; the ranks agree with one 4-byte all-reduce.

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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.staging import AsyncStager

from lctrain.checkpoint.state import Shards, ShardsLoadPlanner, ShardsSavePlanner
from lctrain.parallel import comm

FORMAT = "lctrain-ckpt-v2"
META = "meta.json"
LATEST = "latest"
PREFIX = "step_"
LINEAGE = "lineage"
CORRUPT = "CORRUPT"
SIDECAR = ".sha256-rank"
#: Names of ancestors kept in a checkpoint's meta.json and in `lineage`.
MAX_LINEAGE = 1000
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


def checkpoint_name(step: int, branch: int = 0) -> str:
    """Directory name of checkpoint `step` of `branch` (branch 0: `step_00000006`; else `step_00000006-b2`)."""
    return f"{PREFIX}{step:08d}" + (f"-b{branch}" if branch else "")


def parse_name(name: str) -> tuple[int, int] | None:
    """(step, branch) of a checkpoint directory name, None for anything else."""
    if not name.startswith(PREFIX):
        return None
    body, _, branch = name[len(PREFIX):].partition("-b")
    if not body.isdigit() or (branch and not branch.isdigit()) or (_ and not branch):
        return None
    return int(body), int(branch or 0)


def _step_of(path: Path) -> int:
    return parse_name(path.name)[0]


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
    found = [p for p in root.iterdir() if p.is_dir() and parse_name(p.name) is not None]
    return sorted(found, key=lambda p: parse_name(p.name), reverse=True)


def read_lineage(root: str | Path) -> list[str] | None:
    """The current lineage's checkpoint names, newest first (from `lineage`, else `latest`); None without either."""
    root = Path(root)
    for name in (LINEAGE, LATEST):
        f = root / name
        if f.is_file():
            names = [n.strip() for n in f.read_text().splitlines() if parse_name(n.strip()) is not None]
            if names:
                return names
    return None


def lineage_candidates(root: str | Path) -> list[Path]:
    """The checkpoints `--resume auto` may use, in order: the current lineage newest first (from `lineage` /
    `latest`; those retention removed are skipped), or every checkpoint newest first for a directory without them."""
    root = Path(root)
    names = read_lineage(root)
    if names is None:
        return list_checkpoints(root)
    return [root / n for n in names if (root / n).is_dir()]


def check_complete(path: str | Path) -> dict:
    """meta.json of `path` after the cheap checks (manifest parses, every file has its size, not marked corrupt)."""
    meta = read_meta(path, verify=False)
    marker = Path(path) / CORRUPT
    if marker.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {marker.read_text().strip()}")
    return meta


def assigned_files(meta: dict, rank: int, world: int) -> list[str]:
    """The manifest files rank `rank` of `world` verifies: the shard files `__<k>_*.distcp` with k % world == rank
    (its own shard when the layout is unchanged), and the rest (`.metadata`) on rank 0. Every file is assigned once."""
    out = []
    for name in sorted(meta["files"]):
        owner = 0
        if name.startswith("__") and name.endswith(".distcp"):
            k = name[2:].split("_", 1)[0]
            owner = int(k) % world if k.isdigit() else 0
        if owner == rank:
            out.append(name)
    return out


def verify_share(path: str | Path, meta: dict, rank: int, world: int) -> list[str]:
    """Check the sha256 of the files assigned to this rank (:func:`assigned_files`); the problems found."""
    path = Path(path)
    problems = []
    for name in assigned_files(meta, rank, world):
        f = path / name
        try:
            ok = f.stat().st_size == meta["files"][name]["size"] and file_sha256(f) == meta["files"][name]["sha256"]
        except OSError as err:
            problems.append(f"checkpoint {str(path)!r} is corrupt: {name} cannot be read ({err})")
            continue
        if not ok:
            problems.append(f"checkpoint {str(path)!r} is corrupt: the sha256 of {name} does not match its manifest "
                            f"entry")
    return problems


def mark_corrupt(path: str | Path, why: str) -> None:
    """Record that `path` failed verification (it stops counting toward checkpoint.keep and is never resumed)."""
    try:
        _write_atomic(Path(path) / CORRUPT, why + "\n")
    except OSError:
        pass


def scan_latest(root: str | Path, verify: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint of the current lineage under `root` (or None) and the newer ones of the
    lineage skipped, with the reason (one process; the trainer verifies in parallel: lctrain.train.trainer).

    A directory without meta.json (a save that never finished) is skipped as "incomplete"; the caller decides
    how loudly to report it.
    """
    skipped = []
    for path in lineage_candidates(root):
        try:
            meta = check_complete(path)
            if verify:
                problems = verify_share(path, meta, 0, 1)
                if problems:
                    raise CheckpointError(problems[0])
        except CheckpointError as err:
            skipped.append((path, str(err)))
            continue
        return path, skipped
    return None, skipped


def find_latest(root: str | Path, verify: bool = True) -> Path | None:
    """The newest complete checkpoint under `root` (scanning newest-first, skipping damaged ones), or None."""
    return scan_latest(root, verify)[0]


class _HashingStream(io.RawIOBase):
    """A write stream that hashes (sha256) and counts the bytes on their way to the file (written in order)."""

    def __init__(self, raw, done):
        super().__init__()
        self.raw, self.sha, self.size, self._done = raw, hashlib.sha256(), 0, done

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = self.raw.write(b)
        view = memoryview(b).cast("B")
        self.sha.update(view[:n] if n is not None and n < len(view) else view)
        self.size += n if n is not None else len(view)
        return n

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        if not self.closed:
            self._done(self.size, self.sha.hexdigest())
        super().close()


class _HashingFileSystem(FileSystem):
    """DCP's local file system whose data files are hashed while they are written (no re-read on save)."""

    def __init__(self) -> None:
        super().__init__()
        self.digests: dict[str, dict] = {}

    @contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as raw:
            if "w" not in mode or not str(path).endswith(".distcp"):
                yield raw
                return
            name = Path(path).name
            stream = _HashingStream(raw, lambda size, sha: self.digests.__setitem__(name, {"size": size,
                                                                                           "sha256": sha}))
            try:
                yield stream
            finally:
                stream.close()


class _HashingWriter(FileSystemWriter):
    """DCP's file writer that records the size and sha256 of the files this rank wrote, computed while writing
    (:class:`_HashingFileSystem`), in a sidecar for the manifest."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fs = _HashingFileSystem()

    def write_data(self, plan, planner) -> Future:
        fut = super().write_data(plan, planner)
        names = sorted({r.storage_data.relative_path for r in fut.wait()})
        root = Path(self.path)
        digests = {n: self.fs.digests[n] for n in names}
        _write_atomic(root / f"{SIDECAR}{_rank()}.json", json.dumps(digests))
        return fut


class _ReusingStager(AsyncStager):
    """Stages a state dict for an asynchronous save into CPU buffers kept from one save to the next.

    Each box (and plain tensor) gets a contiguous CPU buffer, pinned when the source is on a GPU (so the copy is
    a DMA that overlaps nothing else and needs no pageable bounce), allocated at the first save and reused by the
    next ones while its shape and dtype stay the same: steady-state saves allocate nothing. Reuse is safe because
    a Checkpointer has at most one save in flight (the next save waits for the previous one).
    """

    _synchronize_after_execute = False

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.allocated_bytes = 0
        """Bytes of staging buffers allocated so far (all saves together)."""

    def _stage(self, key: tuple, t: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            self.buffers[key] = buf
            self.allocated_bytes += buf.numel() * buf.element_size()
        buf.copy_(t.detach(), non_blocking=t.is_cuda)
        return buf

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in state_dict.items():
            if isinstance(v, Shards):
                out[k] = Shards(v.shape, v.dtype, [(off, self._stage((k, i), t)) for i, (off, t) in enumerate(v.boxes)])
            else:
                out[k] = self._stage((k,), v)
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the non-blocking device-to-host copies have landed
        return out

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
        self.stager = _ReusingStager() if async_save else None
        """An async save's staging buffers, reused by every save of this Checkpointer."""
        self.last: Path | None = None
        """The newest checkpoint this object completed."""
        self.wait_s = 0.0
        """Seconds the training thread spent waiting for in-flight saves."""
        self.branch = 0
        """Branch of the next saves (0 unless this run rewound: see :meth:`continue_from`)."""
        self.ancestors: list[str] = read_lineage(self.root) or []
        """The lineage the next save descends from, newest first (its parent first)."""

    def continue_from(self, path: str | Path | None) -> None:
        """Make the next saves descend from `path`, the checkpoint this run resumed from (None: a fresh start).

        Resuming the head of the current lineage continues it. Resuming an older checkpoint (a rewind), one from
        elsewhere, or starting fresh where checkpoints exist starts a new branch: its checkpoints get new names
        (`step_00000009-b1`), so the abandoned ones are kept (until retention removes them) and never resumed by
        "auto". No communication: every rank reads the same files.
        """
        names = read_lineage(self.root) or []
        branches = [parse_name(p.name)[1] for p in list_checkpoints(self.root)]
        path = Path(path) if path is not None else None
        if path is not None and path.parent.resolve() == self.root.resolve() and names and names[0] == path.name:
            self.branch, self.ancestors = parse_name(path.name)[1], names
            return
        self.branch = 1 + max(branches) if branches or names else 0
        self.ancestors = []
        if path is not None and path.parent.resolve() == self.root.resolve():
            meta = read_meta(path, verify=False)
            self.ancestors = [path.name] + [n for n in meta.get("lineage", []) if parse_name(n) is not None]

    def save(self, step: int, state: dict[str, Any], meta: dict) -> Path:
        """Write `state` (DCP state dict: tensors and :class:`Shards`) and `meta` as checkpoint `step`.

        Collective: every rank calls it with its own share. Returns the final directory, complete when this
        returns (synchronous) or once :meth:`wait` returns (asynchronous).
        """
        self.wait()
        name = checkpoint_name(step, self.branch)
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
                             async_stager=self.stager)
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
        self.ancestors = [final.name] + [n for n in self.ancestors if n != final.name][:MAX_LINEAGE - 1]
        return final

    def _finalize(self, step: int, tmp: Path, final: Path, meta: dict) -> None:
        files: dict[str, dict] = {}
        for side in sorted(tmp.glob(f"{SIDECAR}*.json")):
            files.update(json.loads(side.read_text()))
            side.unlink()
        for f in tmp.iterdir():
            if f.is_file() and f.name not in files:
                files[f.name] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
        ancestors = [n for n in self.ancestors if n != final.name][:MAX_LINEAGE - 1]
        body = dict(meta, format=FORMAT, step=step, saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    saved_ns=time.time_ns(), branch=self.branch, parent=ancestors[0] if ancestors else None,
                    lineage=ancestors, files=files)
        _write_atomic(tmp / META, json.dumps(body, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _write_atomic(self.root / LINEAGE, "\n".join([final.name, *ancestors]) + "\n")
        _write_atomic(self.root / LATEST, final.name + "\n")
        self._retain()

    def _retain(self) -> None:
        """Delete all but the `keep` most recently saved complete checkpoints (corrupt or incomplete ones are not
        counted, so they never push a good one out)."""
        complete = []
        for path in list_checkpoints(self.root):
            try:
                meta = check_complete(path)
            except CheckpointError:
                continue
            complete.append((meta.get("saved_ns", 0), parse_name(path.name), path))
        complete.sort(reverse=True)
        for *_, old in complete[self.keep:]:
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
            if self.group is not None:
                # Rank 0 finalises an async save after the others' writes: nobody returns before it has.
                dist.barrier(group=self.group)
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
