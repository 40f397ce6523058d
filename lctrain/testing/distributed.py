"""Run a function on N gloo ranks in spawned processes and collect each rank's result.

Spawning a rank costs seconds (torch + Megatron imports), so ranks live in a pool kept per world size
for the whole test session: each task runs on every rank of the pool and the pool is reused. A pool
whose ranks failed in different ways (one raised, another timed out in a collective) is torn down and
re-spawned on next use, so one broken test cannot poison the next. Processes are daemonic and also
exit when their parent disappears: nothing is left behind.

    results = run_distributed(my_test_fn, world_size=4, arg1, kw=...)   # list indexed by rank

`fn` must be a module-level function (it is sent by module and name); its args must pickle.
Each task starts with no mesh (`lctrain.parallel.destroy_mesh()`) and no agreed SP call signatures
(`lctrain.sp.utils.clear_agreement_cache()`); `fn` builds the mesh it needs.
"""
from __future__ import annotations

import atexit
import importlib
import importlib.util
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

#: Seconds a collective may wait inside test ranks before it raises (keeps a broken test from hanging): the
#: timeout of the ranks' process group, which gloo enforces on every collective.
TEST_COMM_TIMEOUT_S = float(os.environ.get("LCTRAIN_TEST_COMM_TIMEOUT", "60"))


class DistributedError(RuntimeError):
    """One or more ranks raised; the message holds every failing rank's traceback."""

    def __init__(self, failures: dict[int, str], world_size: int):
        self.failures = failures
        parts = [f"rank {r}/{world_size} failed:\n{tb}" for r, tb in sorted(failures.items())]
        super().__init__("\n".join(parts))


@dataclass
class _Task:
    task_id: int
    module: str
    qualname: str
    module_file: str | None
    args: tuple
    kwargs: dict


def _resolve(module: str, qualname: str, module_file: str | None) -> Callable:
    if module in sys.modules:
        mod = sys.modules[module]
    else:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            if module_file is None:
                raise
            spec = importlib.util.spec_from_file_location(module, module_file)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[module] = mod
            spec.loader.exec_module(mod)
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker(rank: int, world_size: int, port: int, inbox: mp.Queue, outbox: mp.Queue, parent_pid: int,
            sys_path: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
    )
    for p in sys_path:
        if p not in sys.path:
            sys.path.append(p)
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    from datetime import timedelta

    torch.set_num_threads(1)
    # The parent hosts the rendezvous store on a port the OS gave it, so no rank races for a free port.
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                          timeout=timedelta(seconds=TEST_COMM_TIMEOUT_S))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, store=store,
                            timeout=timedelta(seconds=TEST_COMM_TIMEOUT_S))
    from lctrain.parallel import destroy_mesh
    from lctrain.sp.utils import clear_agreement_cache

    while True:
        try:
            task = inbox.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return
            continue
        if task is None:
            break
        try:
            destroy_mesh()
            clear_agreement_cache()
            fn = _resolve(task.module, task.qualname, task.module_file)
            result = fn(*task.args, **task.kwargs)
            outbox.put((task.task_id, rank, True, result, False))
        except BaseException as err:  # noqa: BLE001 - every failure goes back to the parent
            from lctrain.parallel.comm import CollectiveTimeout

            timed_out = isinstance(err, CollectiveTimeout) or "timed out" in str(err).lower()
            outbox.put((task.task_id, rank, False, traceback.format_exc(), timed_out))
    destroy_mesh(release=True)
    dist.destroy_process_group()


class _Pool:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(world_size)]
        from datetime import timedelta

        import torch.distributed as dist

        self.store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=TEST_COMM_TIMEOUT_S))
        port = self.store.port
        self.procs = [
            ctx.Process(target=_worker, daemon=True, name=f"lctrain-test-rank{r}",
                        args=(r, world_size, port, self.inboxes[r], self.outbox, os.getpid(), list(sys.path)))
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self.next_id = 0

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(self, fn: Callable, args: tuple, kwargs: dict, timeout_s: float) -> tuple[list[Any], dict[int, str], bool]:
        self.next_id += 1
        mod = sys.modules.get(fn.__module__)
        task = _Task(self.next_id, fn.__module__, fn.__qualname__, getattr(mod, "__file__", None), args, kwargs)
        for q in self.inboxes:
            q.put(task)
        results: list[Any] = [None] * self.world_size
        failures: dict[int, str] = {}
        healthy = True
        pending = set(range(self.world_size))
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0 or not self.alive():
                for r in pending:
                    failures[r] = ("rank process died" if not self.procs[r].is_alive()
                                   else f"no result within {timeout_s:.0f}s (hung?)")
                return results, failures, False
            try:
                task_id, rank, ok, payload, timed_out = self.outbox.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if task_id != self.next_id:
                continue
            pending.discard(rank)
            if ok:
                results[rank] = payload
            else:
                failures[rank] = payload
                healthy = healthy and not timed_out
        # Ranks that disagree (some failed, some did not) may have left collectives half-matched.
        if failures and len(failures) != self.world_size:
            healthy = False
        return results, failures, healthy

    def close(self) -> None:
        for q in self.inboxes:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=5)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.store = None


_POOLS: dict[int, _Pool] = {}


def shutdown_pools() -> None:
    """Stop every rank process started by :func:`run_distributed`."""
    while _POOLS:
        _, pool = _POOLS.popitem()
        pool.close()


atexit.register(shutdown_pools)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 300.0, **kwargs: Any) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return the results indexed by rank.

    Raises:
        DistributedError: if any rank raised (every failing rank's traceback in the message), or a rank
            died or gave no result within `timeout_s`.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.close()
        pool = _POOLS[world_size] = _Pool(world_size)
    results, failures, healthy = pool.run(fn, args, kwargs, timeout_s)
    if not healthy:
        _POOLS.pop(world_size).close()
    if failures:
        raise DistributedError(failures, world_size)
    return results
