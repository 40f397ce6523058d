"""End-to-end training on gloo ranks: exact resume, resume under another layout, CP invariance, kill mid-save.

All runs use configs/tiny.yaml (a 4-layer LLLA hybrid, seq 32, MQAR, 4 samples per step, CPU float32).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lctrain.checkpoint.store import KILL_ENV, find_latest, read_meta
from lctrain.config import load_config
from lctrain.testing import run_distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
#: float32 tolerance for the same computation under another CP/DP split (different summation order).
RTOL = 2e-5


def _train(overrides: list[str], resume: str = "auto") -> dict:
    from lctrain.train.trainer import run

    r = run(load_config(TINY, overrides), resume)
    return {"losses": r.losses, "final_step": r.final_step, "position": r.position, "evals": r.evals,
            "resumed_from": r.resumed_from}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 uninterrupted steps on cp=1, dp=2 (ZeRO-1), checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("straight")
    res = run_distributed(_train, 2, [f"run.out_dir={out}"])
    assert res[0]["losses"] == res[1]["losses"]
    return out, res[0]


def test_straight_run_dir(straight):
    out, res = straight
    assert sorted(res["losses"]) == [1, 2, 3, 4, 5, 6] and res["position"] == 24
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert {"step", "loss", "tokens", "tokens_per_s", "lr", "grad_norm"} <= set(r)
        assert r["loss"] == res["losses"][r["step"]]
    assert "eval_acc" in records[-1] and 0.0 <= records[-1]["eval_acc"] <= 1.0
    assert (out / "config.yaml").is_file() and any((out / "tb").iterdir())
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert read_meta(out / "checkpoints" / "step_00000003")["position"] == 12


def test_resume_is_bit_exact(straight, tmp_path):
    """3 steps, exit, re-run the same command: steps 4-6 equal the straight run bit for bit."""
    _, ref = straight
    first = run_distributed(_train, 2, [f"run.out_dir={tmp_path}", "train.exit_after=3"])[0]
    assert first["final_step"] == 3 and first["position"] == 12
    assert first["losses"] == {s: ref["losses"][s] for s in (1, 2, 3)}
    second = run_distributed(_train, 2, [f"run.out_dir={tmp_path}"])[0]
    assert second["resumed_from"].endswith("step_00000003")
    assert second["losses"] == {s: ref["losses"][s] for s in (4, 5, 6)}
    assert second["position"] == 24
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("layout", [["parallel.cp=2", "train.zero_stage=2"], ["parallel.tp=2", "train.zero_stage=3"]],
                         ids=["cp2-zero2", "tp2-zero3"])
def test_resume_under_another_layout(straight, tmp_path, layout):
    """The step-3 checkpoint of dp=2 (ZeRO-1) resumed on cp=2 or tp=2 (dp=1) continues with the same losses."""
    src, ref = straight
    res = run_distributed(_train, 2, [f"run.out_dir={tmp_path}", *layout],
                          resume=str(src / "checkpoints" / "step_00000003"))
    assert res[0]["losses"] == res[1]["losses"]
    assert sorted(res[0]["losses"]) == [4, 5, 6] and res[0]["position"] == 24
    for s, v in res[0]["losses"].items():
        assert v == pytest.approx(ref["losses"][s], rel=RTOL), s


def test_cp1_and_cp2_give_the_same_losses(straight, tmp_path):
    _, ref = straight
    res = run_distributed(_train, 2, [f"run.out_dir={tmp_path}", "parallel.cp=2", "train.exit_after=3",
                                      "checkpoint.every=0", "checkpoint.at_end=false"], resume="none")[0]
    assert sorted(res["losses"]) == [1, 2, 3]
    for s, v in res["losses"].items():
        assert v == pytest.approx(ref["losses"][s], rel=RTOL), s
    # train.exit_after always ends with a checkpoint, even with checkpoint.at_end=false
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_00000003"]


def _cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lctrain", "train", TINY, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def test_killed_during_save_resumes_from_previous(straight, tmp_path):
    """SIGKILL inside the step-4 save (after the shards, before the rename): the re-run resumes from step 2."""
    _, ref = straight
    args = ["--nproc", "2", f"run.out_dir={tmp_path}", "checkpoint.every=2"]
    killed = _cli(args, {KILL_ENV: "4"})
    assert killed.returncode != 0, killed.stderr[-2000:]
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step_00000004").is_dir()
    assert find_latest(root) == root / "step_00000002"
    assert (root / "latest").read_text().strip() == "step_00000002"
    again = _cli(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr and "step 2 (sample 8)" in again.stdout + again.stderr
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {r["step"]: r["loss"] for r in records} == ref["losses"]
    assert read_meta(root / "step_00000006")["position"] == 24
    assert not (root / ".tmp-step_00000004").exists()


def test_missing_and_corrupt_checkpoint(straight, tmp_path):
    from lctrain.checkpoint.store import CheckpointError
    from lctrain.train.trainer import run

    cfg = load_config(TINY, [f"run.out_dir={tmp_path}"])
    with pytest.raises(CheckpointError, match="nowhere"):
        run(cfg, resume=str(tmp_path / "nowhere"))
    bad = tmp_path / "bad"
    shutil.copytree(straight[0] / "checkpoints" / "step_00000006", bad)
    shard = next(bad.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{bad}.*corrupt"):
        run(cfg, resume=str(bad))
    from lctrain.train.cli import main

    assert main([TINY, f"run.out_dir={tmp_path}", "--resume-from", str(bad), "--dry-run"]) == 2


def test_dry_run(tmp_path, capsys):
    from lctrain.train.cli import main

    assert main([TINY, f"run.out_dir={tmp_path}", "parallel.cp=2", "--nproc", "4", "--dry-run"]) == 0
    assert "tp=1 cp=2 dp=2 grad_accum=2" in capsys.readouterr().out
    assert not tmp_path.joinpath("checkpoints").exists()
    assert main([TINY, "parallel.cp=3", "--nproc", "3", "--dry-run"]) == 2
    assert "not divisible by 6" in capsys.readouterr().err
    assert main([TINY, "train.global_batch_size=3", "--nproc", "2", "--dry-run"]) == 2
    assert main([TINY, "train.nope=1", "--dry-run"]) == 2


def test_losses_are_read_at_log_points_only(straight, tmp_path):
    """train.log_every=4 with checkpoints at 3 and 6: the device is read at steps 3, 4 and 6 only, yet every step's
    loss is returned, equal to the run that reads every step (log_every=1), and metrics.jsonl has the log steps."""
    _, ref = straight
    res = run_distributed(_train, 2, [f"run.out_dir={tmp_path}", "train.log_every=4"])[0]
    assert res["losses"] == ref["losses"]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [4, 6]


def test_resume_compares_model_configs_with_defaults_for_newer_keys():
    """A checkpoint saved before a model-config field existed resumes when the field keeps its default, and is
    refused when the run sets it otherwise; activation checkpointing never counts."""
    from lctrain.config import to_dict
    from lctrain.models.config import ModelConfig
    from lctrain.train.trainer import _model_dict

    old = to_dict(ModelConfig(layer_pattern="LA"))
    del old["window_size"], old["window_sp"]
    assert _model_dict(old) == _model_dict(ModelConfig(layer_pattern="LA", activation_checkpointing="full"))
    assert _model_dict(old) != _model_dict(ModelConfig(layer_pattern="LA", window_size=64))
