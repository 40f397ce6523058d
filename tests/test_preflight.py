"""The pre-reservation check: every reason a config cannot run at a target scale, found before any rank starts."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from lctrain.config import load_config
from lctrain.launch.cli import launch_main, submit_main
from lctrain.preflight import CHECKS, PreflightError, Target, preflight, require_preflight

ROOT = Path(__file__).resolve().parents[1]
DEMO, CLUSTER, TINY = (str(ROOT / "configs" / n) for n in ("demo.yaml", "cluster-demo.yaml", "tiny.yaml"))


def _cfg(name: str = "tiny.yaml", *overrides: str):
    return load_config(ROOT / "configs" / name, list(overrides))


def test_demo_batch_problem_is_found_at_16_gpus_and_not_at_4_ranks():
    cfg = _cfg("demo.yaml")
    assert preflight(cfg, Target.of(4, 4)) == []          # `make demo`: 4 local ranks, dp 2
    (problem,) = preflight(cfg, Target.of(16, 16))         # 16 ranks on one machine: out_dir may be relative
    assert "train.global_batch_size=64 is not divisible by train.micro_batch_size x DP = 16 x 8 = 128" in problem
    assert "e.g. train.micro_batch_size=8" in problem
    # two real nodes: the relative out_dir is a second, independent problem, reported in the same pass
    problems = preflight(cfg, Target(16, 8, 2))
    assert len(problems) == 2 and "run.out_dir='runs/demo' is relative" in problems[1]
    with pytest.raises(PreflightError) as err:
        require_preflight(cfg, Target(16, 8, 2))
    assert err.value.problems == problems and str(err.value).count("\n  - ") == 2


@pytest.mark.parametrize("overrides, world, expect", [
    (["parallel.cp=3", "data.seq_len=36"], 4, "world size 4 is not divisible by tp*cp = 1*3 = 3"),
    (["parallel.cp=4", "data.seq_len=36"], 4, "sequence length 36 is not divisible by 8 (2*CP with CP=4"),
    (["parallel.cp=4", "data.seq_len=36", "parallel.cp_layout=contiguous"], 4, None),   # CP divides 36
    (["parallel.cp=8", "data.seq_len=36", "parallel.cp_layout=contiguous"], 8,
     "sequence length 36 is not divisible by 8 (CP with CP=8"),
    (["parallel.tp=4"], 4, "model.num_heads 2 is not divisible by the TP size 4"),
    (["parallel.cp=2", "model.softmax_sp=ulysses", "model.num_heads=4", "model.num_kv_heads=4",
      "model.hidden_size=32"], 2, None),
    (["parallel.cp=4", "model.softmax_sp=ulysses"], 4, "ulysses needs the heads per TP rank (2/1 = 2) divisible"),
    (["parallel.cp=2", "model.linear_sp=lasp1"], 2, "linear_sp='lasp1' needs cp_layout='contiguous'"),
    (["train.global_batch_size=6"], 4, "train.global_batch_size=6 is not divisible by train.micro_batch_size x DP"),
    (["data.mqar_vocab_size=512"], 1, "produces token ids up to 511, but model.vocab_size is 256"),
    (["train.lr=0"], 1, "train.lr must be > 0"),
])
def test_each_check(overrides, world, expect):
    problems = preflight(_cfg("tiny.yaml", *overrides), world)
    if expect is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expect in problems[0], problems


def test_multi_node_and_ray_job_need_an_absolute_out_dir():
    rel = _cfg("tiny.yaml")
    absolute = _cfg("tiny.yaml", "run.out_dir=/shared/runs/tiny")
    assert preflight(rel, Target(4, 2, 2)) and not preflight(absolute, Target(4, 2, 2))
    assert not preflight(rel, Target(4, 2, 2, one_machine=True))       # a private local cluster: one filesystem
    assert not preflight(rel, Target(2, 2, 1))
    (problem,) = preflight(rel, Target(1, 1, 1, ray_job=True))
    assert "a Ray job needs an absolute path" in problem and "Ray deletes" in problem
    assert preflight(rel, 4, procs_per_node=2) and preflight(rel, 4, multi_node=True)


def test_tp_groups_must_stay_inside_a_node():
    cfg = _cfg("tiny.yaml", "parallel.tp=2", "run.out_dir=/shared/x", "train.global_batch_size=6")
    assert preflight(cfg, Target(4, 2, 2)) == []
    (problem,) = preflight(cfg, Target(3 * 2, 3, 2))
    assert "parallel.tp=2 does not divide the 3 ranks per node" in problem
    (problem,) = preflight(cfg, Target(4, 4, 2))
    assert "2 node(s) x 4 rank(s) per node != world size 4" in problem


def test_checks_are_a_list_of_functions():
    """Issue 12 adds the predicted-memory check by appending to CHECKS: it runs with the others."""
    seen = []
    CHECKS.append(lambda cfg, target: seen.append(target.world_size) or ["predicted 99 GiB > 80 GiB"])
    try:
        assert preflight(_cfg(), 2)[-1] == "predicted 99 GiB > 80 GiB" and seen == [2]
    finally:
        CHECKS.pop()


def test_launch_and_submit_dry_run_fail_in_seconds_without_ray(capsys):
    ray.shutdown()
    t0 = time.monotonic()
    assert launch_main([DEMO, "--nodes", "2", "--procs-per-node", "8", "--address", "127.0.0.1:9",
                        "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "configs/demo.yaml cannot run on 2 node(s) x 8 rank(s)" in err and "16 x 8 = 128" in err
    assert "run.out_dir='runs/demo' is relative" in err
    # not even --dry-run is needed to stop it before Ray: the unreachable address is never dialled
    assert launch_main([DEMO, "--nodes", "2", "--procs-per-node", "8", "--address", "127.0.0.1:9"]) == 2
    assert "cannot reach" not in capsys.readouterr().err
    assert submit_main([DEMO, "--address", "http://127.0.0.1:9", "--nodes", "2",
                        "--procs-per-node", "8"]) == 2
    assert "16 x 8 = 128" in capsys.readouterr().err
    assert launch_main([CLUSTER, "--nodes", "2", "--procs-per-node", "8", "--dry-run"]) == 0
    assert "preflight OK: world=16 (2 node(s) x 8) tp=1 cp=8 dp=2 grad_accum=32" in capsys.readouterr().out
    assert submit_main([TINY, "run.out_dir=/shared/runs/t", "--address", "http://127.0.0.1:9",
                        "--dry-run"]) == 0
    assert time.monotonic() - t0 < 20 and not ray.is_initialized()


def test_train_dry_run_takes_the_target_world(capsys):
    from lctrain.train.cli import main

    assert main([DEMO, "--dry-run", "--world-size", "16", "--procs-per-node", "8"]) == 2
    err = capsys.readouterr().err
    assert "16 x 8 = 128" in err and "relative" in err
    assert main([DEMO, "--dry-run", "--nproc", "4"]) == 0
    assert "config and layout OK" in capsys.readouterr().out
    assert main([CLUSTER, "--dry-run", "--world-size", "32", "--procs-per-node", "8"]) == 0
    assert "world=32 tp=1 cp=8 dp=4" in capsys.readouterr().out
    assert main([DEMO, "--world-size", "16"]) == 2


def test_broken_flash_attn_is_a_problem_on_a_gpu_machine(monkeypatch):
    import torch

    from lctrain.ops import attention_flash_attn

    def broken():
        raise RuntimeError("flash-attn is installed but fails to import: undefined symbol (test)")

    monkeypatch.setattr(attention_flash_attn, "_interface", broken)
    assert preflight(_cfg(), 1) == []                     # no GPU: the CPU run never uses flash-attn
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    (problem,) = preflight(_cfg(), 1)
    assert "fails to import: undefined symbol" in problem


def test_hardware_adds_the_memory_check(capsys):
    assert launch_main([CLUSTER, "--nodes", "2", "--procs-per-node", "8", "--hardware", "h100", "--dry-run"]) == 0
    capsys.readouterr()
    assert launch_main([CLUSTER, "data.seq_len=67108864", "--nodes", "2", "--procs-per-node", "8",
                        "--hardware", "h100", "--dry-run"]) == 2
    assert "predicted memory per GPU" in capsys.readouterr().err
    assert submit_main([CLUSTER, "--address", "http://127.0.0.1:9", "--procs-per-node", "8", "--hardware", "tpu9",
                        "--dry-run"]) == 2
    assert "unknown hardware" in capsys.readouterr().err
