"""`make gpu-check OUT=dir PART=kernels|sp|train|all`: the GPU run that validates and calibrates what the CPU can't.

    python scripts/gpu_check.py --out DIR [--part kernels|sp|train|all] [--budget 540] [--dry-run]

On a CUDA machine, in the repository root, within a fixed time budget (default 540 s for all steps together, so
one device call of 600 s holds it; a step that would start past the budget is skipped and says so):

  setup    installs the wheels carried in `.whl/` (`make gpu-wheels` makes them on a CPU machine) into a private
           folder put on PYTHONPATH, and lctrain itself (editable, no index);
  kernels  validate: every backend of every local op that is available here (attention: sdpa, flash_attn,
           triton; linear attention: chunk, triton; gated linear attention and the gated delta rule: chunk,
           fla) runs forward + backward on CUDA against the plain-PyTorch reference in float32 (bf16 GQA
           inputs, causal, a non-square causal block); the verdicts go to OUT/gpu_validated.json
           (`lctrain.ops.registry.record_gpu_validation`): the record dispatch reads, once a session copies it
           to lctrain/ops/gpu_validated.json and commits it. Then the GPU-marked tests and the kernel benchmark;
  sp       syncs: every SP method x gate kind x packed documents, one rank on CUDA, steady-state forward +
           backward under CUDA's own sync detector (`torch.cuda.set_sync_debug_mode`) and lctrain's syncing-op
           detector; then `lctrain bench sp`;
  train    a small real config (configs/tiny.yaml widened to hidden 1024, 4K tokens, bf16) trains 3 steps on
           one GPU and reports `torch.cuda.max_memory_allocated()`; `lctrain rehearse` of the same config
           reports its `peak_bytes`; the summary gives both and their ratio (the rehearsal's calibration).

Everything is written under OUT: one log per step, OUT/results.json, OUT/summary.md, OUT/gpu_validated.json.
The last thing printed is the summary, at most 12 KB (`SUMMARY_LIMIT`). Without CUDA (or with --dry-run) it
prints the plan and an empty summary and exits 0: that is what CI checks.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("kernels", "sp", "train")
#: The printed summary's size bound (bytes, UTF-8).
SUMMARY_LIMIT = 12 * 1024
#: The train part's config: tiny.yaml widened so memory is dominated by the model and activations.
TRAIN_CONFIG = "configs/tiny.yaml"
TRAIN_OVERRIDES = ["model.hidden_size=1024", "model.num_heads=8", "model.num_kv_heads=8", "model.ffn_hidden_size=2048",
                   "data.seq_len=4096", "train.steps=3", "train.dtype=bfloat16", "checkpoint.every=0",
                   "checkpoint.at_end=false", "train.eval_batches=1"]


def plan(args: argparse.Namespace, gpus: int, python: str = sys.executable) -> list[tuple[str, str, list[str]]]:
    """(part, title, command) of every step a GPU run executes, in order, for `args.part`."""
    out = Path(args.out)
    me = [python, str(Path(__file__).resolve())]
    steps = []
    wheels = sorted(Path(args.wheels).glob("*.whl")) if Path(args.wheels).is_dir() else []
    if wheels:
        steps.append(("setup", "install carried wheels", [python, "-m", "pip", "install", "-q", "--no-index",
                                                          "--no-deps", "--no-compile", "--upgrade", "--target",
                                                          args.site, *map(str, wheels)]))
    steps.append(("setup", "install lctrain", [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                               "--no-build-isolation", "-e", str(ROOT)]))
    parts = PARTS if args.part == "all" else (args.part,)
    if "kernels" in parts:
        steps.append(("kernels", "validate backends", [*me, "--step", "validate", "--out", str(out)]))
        steps.append(("kernels", "GPU tests", [python, "-m", "pytest", "-q", "-m", "gpu", "tests/kernels",
                                               "-p", "no:cacheprovider"]))
        steps.append(("kernels", "kernel benchmark", [python, "benchmarks/bench_kernels.py", "--out",
                                                      str(out / "kernel_benchmarks.md"), "--seqlens", "4096",
                                                      "16384", "--rep", "10"]))
    if "sp" in parts:
        steps.append(("sp", "syncs per steady-state step", [*me, "--step", "syncs", "--out", str(out)]))
        bench_sp = ["-m", "lctrain", "bench", "sp", "--dtype", "bfloat16", "--seq", "4096", "16384",
                    "--heads", "16", "--dim", "128"]
        if gpus > 1:
            steps.append(("sp", f"SP benchmark ({gpus} GPUs, NCCL)", [python, "-m", "torch.distributed.run",
                                                                      f"--nproc-per-node={gpus}", *bench_sp]))
        else:
            steps.append(("sp", "SP benchmark (1 GPU)", [python, *bench_sp, "--world", "1"]))
    if "train" in parts:
        steps.append(("train", "train on the GPU", [*me, "--step", "train", "--out", str(out)]))
        steps.append(("train", "rehearse the same config", [python, "-m", "lctrain", "rehearse", TRAIN_CONFIG,
                                                            *TRAIN_OVERRIDES, f"run.out_dir={out / 'rehearse_run'}",
                                                            "--gpus", "1", "--steps", "3", "--hardware",
                                                            args.hardware, "--json"]))
    return steps


# ----------------------------------------------------------------------------------------------- summary

def summary_text(header: str, rows: list[dict], facts: list[str], limit: int = SUMMARY_LIMIT) -> str:
    """The summary printed last: a header, one line per step, the facts (validation, syncs, memory), then as much
    of each failed step's output tail as fits; never more than `limit` bytes."""
    lines = [header, ""] + [f"- {r['title']} [{r['part']}]: {r['status']} in {r['seconds']:.0f} s" for r in rows]
    text = "\n".join(lines + [""] + facts) + "\n"
    tails = [(r["title"], r.get("tail", "")) for r in rows if r["status"] not in ("ok", "skipped") and r.get("tail")]
    room = limit - len(text.encode()) - 64
    for title, tail in tails:
        share = max(0, room // max(len(tails), 1) - len(title) - 16)
        if share <= 0:
            break
        piece = tail.encode()[-share:].decode(errors="ignore")
        text += f"\n--- {title} (tail) ---\n{piece}\n"
    data = text.encode()
    if len(data) > limit:
        text = data[: limit - 20].decode(errors="ignore") + "\n[summary cut]\n"
    return text


def _facts(out: Path) -> list[str]:
    """Key results from the steps' JSON files under `out` (whatever exists)."""
    facts = []
    record = out / "gpu_validated.json"
    if record.exists():
        entries = json.loads(record.read_text()).get("backends", {})
        facts.append("GPU validation (OUT/gpu_validated.json; commit it as lctrain/ops/gpu_validated.json):")
        facts += [f"  {key}: {'passed' if e.get('passed') else 'FAILED'} {e.get('max_rel_err', e.get('error', ''))}"
                  for key, e in entries.items()]
    syncs = out / "syncs.json"
    if syncs.exists():
        cases = json.loads(syncs.read_text())
        bad = {k: v for k, v in cases.items() if v["cuda_syncs"] or v["syncing_ops"]}
        facts.append(f"syncs: {len(cases)} SP cases, {len(bad)} with a sync in the steady-state step")
        facts += [f"  {k}: cuda {v['cuda_syncs']}, ops {v['syncing_ops']}" for k, v in list(bad.items())[:20]]
    real, reh = out / "train.json", out / "rehearse.json"
    if real.exists() and reh.exists():
        try:
            peak = json.loads(reh.read_text())["peak_bytes"]
            got = json.loads(real.read_text())["max_memory_allocated"]
            facts.append(f"memory: rehearse peak_bytes {peak} vs torch.cuda.max_memory_allocated {got} "
                         f"(ratio {peak / max(got, 1):.3f})")
        except (KeyError, ValueError) as err:
            facts.append(f"memory: comparison unreadable ({err!r})")
    return facts


# ----------------------------------------------------------------------------------------------- steps on the GPU

def _rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def step_validate(out: Path, device: str = "cuda") -> dict:
    """Each available backend of each op against the float32 reference, forward + backward, on CUDA (`device`
    "cpu": the same code on CPU at a quarter of the size, for the CPU test of this script; nothing recorded)."""
    import torch

    from lctrain.ops import attention, gated_delta, gla, linear_attention
    from lctrain.ops.registry import record_gpu_validation

    torch.manual_seed(0)
    dev, bf = torch.device(device), torch.bfloat16
    n = 256 if dev.type == "cuda" else 64
    results, details = {}, {}

    def compare(fn, backend, reference, inputs, tol, cast=(0, 1, 2)):
        """Max relative error (of max |ref|) over the output and every input gradient: `backend` on bf16 copies
        of the inputs at `cast` (the others as given, gates in float32), `reference` on float32 copies."""
        errs = []
        outs = {}
        for name, dtype in ((backend, bf), (reference, torch.float32)):
            xs = [(x.to(dtype) if i in cast else x).detach().requires_grad_(True) for i, x in enumerate(inputs)]
            o = fn(name, xs)
            o.backward(torch.ones_like(o) / o.numel() ** 0.5)
            outs[name] = [o] + [x.grad for x in xs]
        for a, b in zip(outs[backend], outs[reference]):
            errs.append(_rel(a, b))
        return max(errs), tol

    def check(registry, name, fn):
        key = f"{registry.kind}/{name}"
        if name not in registry.backends() or not registry.backends()[name].available():
            return
        try:
            err, tol = fn()
            results[key], details[key] = err <= tol, {"max_rel_err": round(err, 6), "tol": tol}
        except Exception as e:  # noqa: BLE001 - a backend that raises on the GPU failed its validation
            results[key], details[key] = False, {"error": repr(e)[:300]}

    def attn(name, xs):
        return attention.attention(*xs[:3], causal=True, backend=name)

    q, k, v = torch.randn(2, n, 8, 64, device=dev), torch.randn(2, n, 2, 64, device=dev), \
        torch.randn(2, n, 2, 64, device=dev)
    for name in ("sdpa", "flash_attn", "triton"):
        def run_attn(name=name):
            square = compare(attn, name, "reference", [q, k, v], 3e-2)[0]
            block = compare(attn, name, "reference", [q[:, :n // 2], k, v], 3e-2)[0]  # sq < sk: bottom-right
            return max(square, block), 3e-2
        check(attention.REGISTRY, name, run_attn)

    qa, ka, va = (torch.randn(2, 2 * n, 4, 64, device=dev) * 0.3 for _ in range(3))
    ld = -torch.rand(4, device=dev) * 0.1
    for name in ("chunk", "triton"):
        check(linear_attention.REGISTRY, name, lambda name=name: compare(
            lambda n, xs: linear_attention.linear_attention(*xs, backend=n)[0], name, "reference",
            [qa, ka, va, ld], 3e-2))
    g = -torch.rand(2, 2 * n, 4, device=dev) * 0.1
    for name in ("chunk", "fla"):
        check(gla.REGISTRY, name, lambda name=name: compare(
            lambda n, xs: gla.gated_linear_attention(*xs, backend=n)[0], name, "recurrent", [qa, ka, va, g], 3e-2))
    kn = torch.nn.functional.normalize(ka, dim=-1)
    beta = torch.rand(2, 2 * n, 4, device=dev)
    for name in ("chunk", "fla"):
        check(gated_delta.REGISTRY, name, lambda name=name: compare(
            lambda n, xs: gated_delta.gated_delta_rule(*xs, backend=n)[0], name, "recurrent",
            [qa, kn, va, g, beta], 3e-2, cast=(0, 1, 2, 4)))
    if dev.type == "cuda":
        record_gpu_validation(results, torch.cuda.get_device_name(), out / "gpu_validated.json", details)
    return {"validated": results, "details": details}


def step_syncs(out: Path, device: str = "cuda") -> dict:
    """Every SP method x gate x packing, one rank on CUDA: syncs in the steady-state forward + backward (`device`
    "cpu": the same code at 1/16 of the length, lctrain's detector only, for the CPU test of this script)."""
    import warnings

    import torch

    from lctrain import sp
    from lctrain.parallel import MeshConfig, init_mesh
    from lctrain.sp.documents import PackedDocuments
    from lctrain.sp.lasp1_delta import lasp1_delta_attention
    from lctrain.testing.hot_path import count_syncing_ops

    init_mesh(MeshConfig(cp=1))
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    b, s, h, d = 2, 2048 if cuda else 128, 4, 64
    bounds = sorted({0, s, 2 * s} | set(range(0, 2 * s, 37)))  # ~110 documents: isin would take its sorting path
    cu = torch.tensor(bounds)
    gates = {"none": None, "head": (h,), "scalar": (b, s, h), "vector": (b, s, h, d)}
    methods = {"ring": ("none",), "allgather": ("none",), "ulysses": ("none",), "lasp2": tuple(gates),
               "lasp1": tuple(gates), "lasp2_delta": ("none", "head", "scalar"), "lasp1_delta": ("none", "head",
                                                                                                 "scalar")}
    cases = {}
    for method, kinds in methods.items():
        for kind in kinds:
            for packing in ("none", "tensor", "documents"):
                q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                gshape = gates[kind]
                g = None if gshape is None else (-torch.rand(*gshape, device=dev) * 0.1).requires_grad_(True)
                beta = torch.rand(b, s, h, device=dev, dtype=torch.bfloat16)
                kw = {}
                if packing == "tensor":
                    kw["cu_seqlens"] = cu.to(dev)
                elif packing == "documents":
                    kw["cu_seqlens"] = PackedDocuments.from_host(cu, b, s, 0, 1, "contiguous", dev)

                def call():
                    if method in ("ring", "allgather", "ulysses"):
                        return getattr(sp, f"{method}_attention")(q, k, v, layout="contiguous", **kw)
                    if method == "lasp2":
                        return sp.lasp2_linear_attention(q, k, v, g, **kw)
                    if method == "lasp1":
                        return sp.lasp1_linear_attention(q, k, v, g, **kw)
                    if method == "lasp2_delta":
                        return sp.lasp2_delta_attention(q, k, v, beta, g, **kw)
                    return lasp1_delta_attention(q, k, v, beta, g, **kw)

                key = f"{method} {kind} {packing}"
                try:
                    call().float().sum().backward()  # warm-up
                    if cuda:
                        torch.cuda.synchronize()
                    with warnings.catch_warnings(record=True) as caught, count_syncing_ops() as ops:
                        warnings.simplefilter("always")
                        if cuda:
                            torch.cuda.set_sync_debug_mode("warn")
                        try:
                            call().float().sum().backward()
                        finally:
                            if cuda:
                                torch.cuda.set_sync_debug_mode("default")
                    syncs = [str(w.message)[:120] for w in caught if "synchroniz" in str(w.message)]
                    cases[key] = {"cuda_syncs": len(syncs), "syncing_ops": len(ops.calls),
                                  "first": (syncs + ops.calls)[:2]}
                except Exception as e:  # noqa: BLE001 - reported per case
                    cases[key] = {"cuda_syncs": -1, "syncing_ops": -1, "first": [repr(e)[:200]]}
    (out / "syncs.json").write_text(json.dumps(cases, indent=1))
    return {"cases": len(cases), "with_syncs": sum(1 for c in cases.values() if c["cuda_syncs"] or c["syncing_ops"])}


def step_train(out: Path) -> dict:
    """The train part's config for 3 steps on this GPU; its peak allocated memory."""
    import torch

    from lctrain.config import load_config
    from lctrain.train.trainer import run

    cfg = load_config(ROOT / TRAIN_CONFIG, TRAIN_OVERRIDES + [f"run.out_dir={out / 'train_run'}"])
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    result = run(cfg, "none")
    got = {"max_memory_allocated": torch.cuda.max_memory_allocated(),
           "max_memory_reserved": torch.cuda.max_memory_reserved(), "seconds": round(time.time() - t0, 1),
           "losses": {str(k): v for k, v in result.losses.items()}, "device": torch.cuda.get_device_name()}
    (out / "train.json").write_text(json.dumps(got, indent=1))
    return got


STEPS = {"validate": step_validate, "syncs": step_syncs, "train": step_train}


# ----------------------------------------------------------------------------------------------- driver

def _hardware() -> str:
    try:
        import torch

        name = torch.cuda.get_device_name().lower() if torch.cuda.is_available() else ""
    except ImportError:
        name = ""
    return "h200" if "h200" in name else "a100-80g" if "a100" in name else "h100"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/lctrain-gpu-check",
                        help="folder every result goes to")
    parser.add_argument("--part", default="all", choices=(*PARTS, "all"))
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of carried wheels")
    parser.add_argument("--site", default="/tmp/lctrain-site", help="where the wheels are installed")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all steps together")
    parser.add_argument("--hardware", default=None, help="the rehearsal's --hardware (default: from the device)")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)  # one step, in this process
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.step:
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(STEPS[args.step](out), indent=1, default=str)[-4000:])
        return 0
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        gpus = 0
    args.hardware = args.hardware or _hardware()
    steps = plan(args, max(gpus, 1))
    if args.dry_run or gpus == 0:
        print("gpu_check: " + ("dry run" if args.dry_run else "no CUDA GPU here") + f"; on a GPU machine it runs "
              f"(part {args.part}, {args.budget:.0f} s budget, everything under {out}):")
        for part, title, cmd in steps:
            print(f"  # [{part}] {title}\n  {shlex.join(cmd)}")
        print(summary_text(f"# GPU check: nothing run ({'dry run' if args.dry_run else 'no CUDA GPU'})", [], []))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (args.site, str(ROOT), env.get("PYTHONPATH", "")) if p)
    deadline = time.time() + args.budget
    rows = []
    for part, title, cmd in steps:
        start = time.time()
        slug = "".join(c if c.isalnum() else "_" for c in title.lower()).strip("_")
        if start >= deadline - 5:
            rows.append({"part": part, "title": title, "status": "skipped (budget)", "seconds": 0.0})
            continue
        try:
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=deadline - start)
            code, stdout, text = res.returncode, res.stdout, res.stdout + res.stderr
        except subprocess.TimeoutExpired as e:  # out of time: keep what it printed, say so
            code, stdout = 124, ""
            text = "".join(x.decode(errors="ignore") if isinstance(x, bytes) else (x or "")
                           for x in (e.stdout, e.stderr)) + f"\n(stopped: the {args.budget:.0f} s budget ran out)"
        took = time.time() - start
        (out / f"{slug}.log").write_text(f"$ {shlex.join(cmd)}\n{text}")
        if title.startswith("rehearse") and code in (0, 1):  # 1: the rehearsal ran and has findings
            try:
                report = json.loads(stdout[stdout.index("{"):stdout.rindex("}") + 1])
                (out / "rehearse.json").write_text(json.dumps(report, indent=1))
                code = 0
            except ValueError:
                pass
        rows.append({"part": part, "title": title, "status": "ok" if code == 0 else f"exit {code}",
                     "seconds": took, "tail": text[-3000:]})
        print(f"== [{part}] {title}: {rows[-1]['status']} in {took:.0f} s", flush=True)
    header = (f"# GPU check: {torch.cuda.get_device_name()} x {gpus}, part {args.part}, "
              f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='minutes')}")
    summary = summary_text(header, rows, _facts(out))
    (out / "summary.md").write_text(summary)
    (out / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "tail"} for r in rows],
                                                 indent=1))
    print(summary)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
