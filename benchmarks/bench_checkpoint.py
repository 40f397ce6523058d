"""Sharded checkpoints: blocked/total save time, memory of save and load by allocation, resume verification vs
the number of ranks, and `lctrain export`'s peak memory vs the file size limit.

    python benchmarks/bench_checkpoint.py --world 2 --hidden 1024 --layers 8 --vocab 32768 [--zero 1] [--tp 1]
    python benchmarks/bench_checkpoint.py --world 4 --hidden 512 --layers 8 --vocab 32768 --verify --export

Builds the hybrid model on `world` gloo ranks (CPU, float32), takes one optimizer step (so Adam moments exist),
then per rank: a synchronous save, a load of it, and two asynchronous saves (the second reuses the first one's
staging buffers). Memory is measured by allocation, not RSS: the peak of the running sum of torch's CPU
allocations (torch profiler; lctrain.bench._cpu_peak_bytes) and tracemalloc's peak of Python allocations.

--verify: the ranks' share of the sha256 verification on resume (lctrain.checkpoint.store.verify_share) for
N = 1, 2, 4, ... ranks, each share timed on its own in this process (on N nodes they run at once: the time of a
resume's verification is the largest share). --export: `lctrain export` of the checkpoint with file limits from
5 GB down to 8 MB, its allocation peak beside the largest file and the largest tensor. Timings on a shared
machine are noisy; bytes and peaks are not.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _peaks(fn) -> tuple[int, int]:
    """(torch CPU allocation peak, Python allocation peak) in bytes while `fn` runs."""
    from lctrain.bench import _cpu_peak_bytes

    tracemalloc.start()
    try:
        return _cpu_peak_bytes(fn), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _measure(overrides: list[str], out: str) -> list[dict]:
    from lctrain.checkpoint.state import sharded_state, state_bytes
    from lctrain.checkpoint.store import Checkpointer, load_state
    from lctrain.config import load_config
    from lctrain.models import build_model
    from lctrain.parallel.mesh import init_mesh
    from lctrain.train.engine import build_engine
    from lctrain.train.trainer import plan_run

    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    plan = plan_run(cfg, torch.distributed.get_world_size())
    mesh = init_mesh(cfg.parallel)
    torch.manual_seed(0)
    model, engine = build_engine(lambda: build_model(cfg.model, mesh, cfg.parallel.cp_layout), cfg.train, mesh,
                                 plan.grad_accum)
    ids = torch.randint(0, 256, (1, cfg.data.seq_len // cfg.parallel.cp))
    for _ in range(plan.grad_accum):
        engine.backward(engine(ids, torch.arange(ids.shape[1]), ids).loss_sum)
        engine.step()
    state = sharded_state(engine, mesh, 1)
    rows = []
    for mode in ("sync", "load", "async", "async-again"):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        if mode == "sync":
            ckpt = Checkpointer(Path(out) / "checkpoints", keep=1)
            peak = _peaks(lambda: ckpt.save(1, state, {"position": 0, "config": {"model": dict(
                vars(cfg.model))}}))
            blocked = time.perf_counter() - t0
            path = ckpt.last
        elif mode == "load":
            peak = _peaks(lambda: load_state(path, sharded_state(engine, mesh, 1, for_load=True)))
            blocked = time.perf_counter() - t0
        else:
            if mode == "async":
                actor = Checkpointer(Path(out) / "async", keep=1, async_save=True)
            peak = _peaks(lambda: actor.save(1 if mode == "async" else 2, state, {"position": 0}))
            blocked = time.perf_counter() - t0
            actor.wait()
            if mode == "async-again":
                actor.close()
        total = time.perf_counter() - t0
        rows.append({"mode": mode, "params": model.num_parameters(), "own_MB": state_bytes(state) / 2**20,
                     "torch_peak_MB": peak[0] / 2**20, "python_peak_MB": peak[1] / 2**20, "blocked_s": blocked,
                     "complete_s": total, "checkpoint": str(path),
                     "staged_MB": actor.stager.allocated_bytes / 2**20 if mode.startswith("async") else 0.0})
    return rows


def _verify_table(path: Path, worlds: list[int]) -> None:
    from lctrain.checkpoint.store import assigned_files, read_meta, verify_share

    meta = read_meta(path, verify=False)
    total = sum(f["size"] for f in meta["files"].values())
    print(f"\nresume verification of {path.name} ({total / 2**20:.0f} MB in {len(meta['files'])} files): each rank "
          "hashes its share; the largest share is the time on N nodes")
    print("N  files/rank(max)  MB/rank(max)  s/rank(max)  s(sum of shares)")
    for n in worlds:
        times, sizes, counts = [], [], []
        for r in range(n):
            names = assigned_files(meta, r, n)
            t0 = time.perf_counter()
            assert not verify_share(path, meta, r, n)
            times.append(time.perf_counter() - t0)
            sizes.append(sum(meta["files"][f]["size"] for f in names))
            counts.append(len(names))
        print(f"{n:<2} {max(counts):>15}  {max(sizes) / 2**20:12.0f}  {max(times):11.2f}  {sum(times):16.2f}")


def _export_table(path: Path, out: Path) -> None:
    from lctrain.checkpoint.export import export
    from lctrain.checkpoint.store import stored_tensors

    largest = max(s.numel() * 4 for k, (s, _) in stored_tensors(path).items() if k.startswith("model/"))
    print(f"\nlctrain export of {path.name} (fp32; largest tensor {largest / 2**20:.1f} MB), peak by allocation")
    print("limit_MB  files  largest_file_MB  torch_peak_MB  python_peak_MB  s")
    for limit in (5 * 10**9, 64 * 2**20, 8 * 2**20):
        dest = out / f"export-{limit}"
        t0 = time.perf_counter()
        info, peak = None, None

        def run():
            nonlocal info
            info = export(path, dest, max_shard_bytes=limit)

        peak = _peaks(run)
        sizes = [(dest / f).stat().st_size for f in info["files"]]
        print(f"{limit / 2**20:8.0f}  {len(sizes):5}  {max(sizes) / 2**20:15.1f}  {peak[0] / 2**20:13.1f}  "
              f"{peak[1] / 2**20:14.1f}  {time.perf_counter() - t0:.1f}")
        shutil.rmtree(dest, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--zero", type=int, default=1)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--verify", action="store_true", help="resume verification time vs the number of ranks")
    ap.add_argument("--export", action="store_true", help="lctrain export's peak memory vs the file size limit")
    args = ap.parse_args()
    from lctrain.testing import run_distributed

    heads = max(1, args.hidden // 128)
    overrides = [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", f"model.num_heads={heads}",
                 f"model.num_kv_heads={heads}", f"model.ffn_hidden_size={args.hidden * 11 // 4 // 64 * 64}",
                 f"model.vocab_size={args.vocab}", f"train.zero_stage={args.zero}", f"parallel.tp={args.tp}",
                 "train.global_batch_size=" + str(args.world // args.tp)]
    out = Path(tempfile.mkdtemp(prefix="lctrain-bench-ckpt-"))
    try:
        res = run_distributed(_measure, args.world, overrides, str(out), timeout_s=1800)
        params = res[0][0]["params"]
        print(f"model: {params / 1e6:.0f}M parameters, full fp32 state (master + 2 moments) "
              f"{12 * params / 2**20:.0f} MB; world {args.world}, tp {args.tp}, ZeRO-{args.zero}")
        print("mode         rank  own_MB  torch_peak_MB  python_peak_MB  staged_MB  blocked_s  complete_s")
        for rank, rows in enumerate(res):
            for r in rows:
                print(f"{r['mode']:<12} {rank:>4}  {r['own_MB']:6.0f}  {r['torch_peak_MB']:13.1f}  "
                      f"{r['python_peak_MB']:14.1f}  {r['staged_MB']:9.0f}  {r['blocked_s']:9.2f}  "
                      f"{r['complete_s']:10.2f}")
        ckpt = Path(res[0][0]["checkpoint"])
        if args.verify:
            worlds = sorted({1, 2, 4, args.world, 2 * args.world})
            _verify_table(ckpt, worlds)
        if args.export:
            _export_table(ckpt, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
