"""Sharded checkpoint save: time the training loop is blocked, total write time, per-rank memory, bytes on disk.

    python benchmarks/bench_checkpoint.py --world 2 --hidden 1024 --layers 8 --vocab 32768 [--zero 1] [--tp 1]

Builds the hybrid model on `world` gloo ranks (CPU, float32), takes one optimizer step (so Adam moments exist),
then saves the sharded state once synchronously and once asynchronously (checkpoint.async_save) while a thread
samples the rank's RSS. Per rank it prints: the bytes it owns (its TP slice x ZeRO partition of master + moments),
the RSS peak above the level before the save, the seconds the caller was blocked, and the seconds until the
checkpoint was complete. Timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _measure(overrides: list[str], out: str) -> list[dict]:
    import psutil

    from lctrain.checkpoint.state import sharded_state, state_bytes
    from lctrain.checkpoint.store import Checkpointer
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
    rows = []
    proc = psutil.Process()
    for mode in ("sync", "async"):
        state = sharded_state(engine, mesh, 1)
        peak, stop = [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.002)

        root = Path(out) / mode
        ckpt = Checkpointer(root, keep=1, async_save=mode == "async")
        torch.distributed.barrier()
        base = proc.memory_info().rss
        t = threading.Thread(target=sample)
        t.start()
        t0 = time.perf_counter()
        final = ckpt.save(1, state, {"position": 0})
        blocked = time.perf_counter() - t0
        ckpt.close()
        total = time.perf_counter() - t0
        stop.set()
        t.join()
        torch.distributed.barrier()
        disk = sum(f.stat().st_size for f in final.iterdir()) if final.is_dir() else 0
        rows.append({"mode": mode, "params": model.num_parameters(), "own_MB": state_bytes(state) / 2**20,
                     "rss_peak_delta_MB": (peak[0] - base) / 2**20, "rss_MB": base / 2**20, "blocked_s": blocked,
                     "complete_s": total, "disk_MB": disk / 2**20})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--zero", type=int, default=1)
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args()
    from lctrain.testing import run_distributed

    heads = max(1, args.hidden // 128)
    overrides = [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", f"model.num_heads={heads}",
                 f"model.num_kv_heads={heads}", f"model.ffn_hidden_size={args.hidden * 11 // 4 // 64 * 64}",
                 f"model.vocab_size={args.vocab}", f"train.zero_stage={args.zero}", f"parallel.tp={args.tp}",
                 "train.global_batch_size=" + str(args.world // args.tp)]
    out = tempfile.mkdtemp(prefix="lctrain-bench-ckpt-")
    try:
        res = run_distributed(_measure, args.world, overrides, out, timeout_s=1800)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    params = res[0][0]["params"]
    print(f"model: {params / 1e6:.0f}M parameters, full fp32 state (master + 2 moments) "
          f"{12 * params / 2**20:.0f} MB; world {args.world}, tp {args.tp}, ZeRO-{args.zero}")
    print("mode   rank  own_MB  rss_before_MB  rss_peak_delta_MB  blocked_s  complete_s  disk_MB(all ranks)")
    for rank, rows in enumerate(res):
        for r in rows:
            print(f"{r['mode']:<6} {rank:>4}  {r['own_MB']:6.0f}  {r['rss_MB']:13.0f}  {r['rss_peak_delta_MB']:17.0f}"
                  f"  {r['blocked_s']:9.2f}  {r['complete_s']:10.2f}  {r['disk_MB']:.0f}")


if __name__ == "__main__":
    main()
