"""Start-up cost of the CLI: `lctrain launch ... --dry-run` imports no Megatron, DeepSpeed, Ray or DCP and takes at
most twice `import torch` (both timed here, in fresh interpreters, best of 3; 0.5 s of slack for a loaded machine),
and `import lctrain.config` imports none of them either."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("megatron", "deepspeed", "ray", "transformer_engine", "apex", "flash_attn", "fla", "triton",
         "torch.distributed.checkpoint", "torch._dynamo", "torch._inductor")
DRY_RUN = ["launch", "configs/cluster-demo.yaml", "run.out_dir=/runs/startup", "--nodes", "2", "--procs-per-node",
           "8", "--dry-run"]
REPORT = "import json, sys; print('MODULES=' + json.dumps(sorted(sys.modules)))"


def _run(code: str) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return time.perf_counter() - t0, res


def _heavy(res: subprocess.CompletedProcess) -> list[str]:
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("MODULES="))
    mods = json.loads(line[len("MODULES="):])
    return sorted(m for m in mods if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_dry_run_is_cheap_and_imports_no_heavy_library():
    dry = (f"from lctrain.cli import main; rc = main({DRY_RUN!r}); {REPORT}; sys.exit(rc)")
    torch_s, dry_s = [], []
    for _ in range(3):
        torch_s.append(_run("import torch")[0])
        took, res = _run(dry)
        assert res.returncode == 0, res.stderr
        dry_s.append(took)
    assert "preflight OK" in res.stdout
    assert _heavy(res) == []
    assert "Transformer Engine" not in res.stderr and "Apex" not in res.stderr, res.stderr
    assert min(dry_s) <= 2 * min(torch_s) + 0.5, f"dry-run {min(dry_s):.2f} s vs import torch {min(torch_s):.2f} s"


def test_config_import_is_cheap():
    _, res = _run(f"import lctrain.config; {REPORT}")
    assert res.returncode == 0, res.stderr
    assert _heavy(res) == []


def test_lazy_exports_resolve_every_name():
    code = ("import importlib\n"
            "for p in ('lctrain.data', 'lctrain.models', 'lctrain.checkpoint', 'lctrain.testing'):\n"
            "    m = importlib.import_module(p)\n"
            "    assert sorted(m.__all__) == sorted(set(m.__all__)), p\n"
            "    for n in m.__all__: getattr(m, n)\n"
            "    assert set(m.__all__) <= set(dir(m)), p\n"
            "    try:\n        m.no_such_name\n    except AttributeError: pass\n"
            "    else: raise SystemExit(p + ': unknown name resolved')\n")
    _, res = _run(code)
    assert res.returncode == 0, res.stderr
    assert "Transformer Engine" not in res.stderr
