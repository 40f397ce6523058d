"""`lctrain plan`: clear errors for bad requests, JSON rows, the search never recommends an OOM layout."""
from __future__ import annotations

import json
import time

import pytest

from lctrain.plan.cli import main
from lctrain.plan.hardware import get_hardware
from lctrain.plan.search import recommend, search
from lctrain.config import load_config

ROW_KEYS = {"tp", "cp", "dp", "softmax_sp", "linear_sp", "zero_stage", "activation_checkpointing", "mem_gb", "oom",
            "step_s", "tokens_per_s", "mfu", "comm_frac"}


@pytest.mark.parametrize("args,message", [
    (["configs/tiny.yaml", "parallel.cp=4", "--gpus", "6", "--seq", "64"], "not divisible by tp*cp"),
    (["configs/tiny.yaml", "--gpus", "2", "--seq", "64", "--hardware", "tpu-v9"], "unknown hardware 'tpu-v9'"),
    (["configs/tiny.yaml", "parallel.cp=4", "--gpus", "4", "--seq", "36"], "not divisible by 2*CP = 8"),
    (["configs/tiny.yaml", "--gpus", "0", "--seq", "64"], "--gpus must be an integer >= 1"),
    (["configs/tiny.yaml", "--gpus", "4", "--seq", "34", "--search", "--cp", "4"], "no valid layout"),
    (["configs/tiny.yaml", "--gpus", "4", "--seq", "64", "--pp", "2"], "pipeline parallelism (--pp 2) is not modelled"),
    (["configs/tiny.yaml", "parallel.cp=2", "--gpus", "4", "--seq", "64", "--global-batch", "3"],
     "not a positive multiple of micro-batch x DP"),
])
def test_bad_input_is_a_clear_error(args, message, capsys):
    assert main(args + ["--no-cache"]) == 2
    assert message in capsys.readouterr().err


def test_json_rows_of_the_configured_layout(capsys):
    assert main(["configs/tiny.yaml", "parallel.cp=2", "--gpus", "4", "--seq", "64", "--json", "--no-cache"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and ROW_KEYS <= set(rows[0])
    assert (rows[0]["tp"], rows[0]["cp"], rows[0]["dp"]) == (1, 2, 2)
    r = rows[0]
    # The breakdown: compute by class and by mixer add up to the compute, memory-bound bytes by op class.
    assert set(r["compute_by_mixer_s"]) == {"L", "A", "MLP", "embed/loss"}
    assert sum(r["compute_by_mixer_s"].values()) == pytest.approx(r["compute_s"])
    assert sum(r["compute_by_class_s"].values()) == pytest.approx(r["compute_s"])
    assert set(r["memory_bound_bytes"]) <= {"elementwise", "reduction", "copy", "fill"}
    assert r["accumulation"] == 2  # tiny's global batch 4 = micro-batch 1 x DP 2 x 2
    assert r["step_s"] == pytest.approx(r["compute_s"] + r["comm_exposed_s"] + r["optimizer_s"])


def test_search_never_recommends_oom():
    """A device whose memory lies between the search's smallest and largest rows: the recommendation fits."""
    from dataclasses import replace

    from lctrain.plan.search import SimCache

    cfg = load_config("configs/tiny.yaml").model
    narrow = dict(tps=[1], cps=[2, 4], softmax_sps=["allgather"], linear_sps=["lasp2"],
                  checkpointing=("none", "full"), zero_stages=(0, 3), cache=SimCache(None))
    big = search(cfg, 8, 8, 512, get_hardware("h100"), **narrow)
    mems = sorted(r.mem_gb for r in big)
    device = replace(get_hardware("h100"), memory_gb=(mems[0] + mems[-1]) / 2)
    rows = search(cfg, 8, 8, 512, device, **narrow)
    assert any(r.oom for r in rows) and any(not r.oom for r in rows)
    best = recommend(rows)
    assert best is not None and not best.oom and best.mem_gb <= device.memory_gb
    assert best.tokens_per_s == max(r.tokens_per_s for r in rows if not r.oom)
    nothing = replace(device, memory_gb=mems[0] / 2)
    assert recommend(search(cfg, 8, 8, 512, nothing, **narrow)) is None


@pytest.mark.slow
def test_8b_64_gpus_1m_tokens_plan_time(capsys):
    """The issue's budget: a 64-GPU, 1M-token plan of an 8B model in under 2 minutes on this machine."""
    t0 = time.perf_counter()
    assert main(["configs/llama3-8b.yaml", "parallel.cp=64", "--gpus", "64", "--seq", str(1 << 20),
                 "--hardware", "h100", "--json", "--no-cache"]) == 0
    elapsed = time.perf_counter() - t0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["cp"] == 64 and row["mem_gb"] > 0
    assert elapsed < 120, elapsed


def test_plot_writes_a_png(tmp_path, capsys):
    out = tmp_path / "plan.png"
    assert main(["configs/tiny.yaml", "parallel.cp=2", "model.layer_pattern=L", "--gpus", "2", "--seq", "256",
                 "--hardware", "a100-80g", "--plot", str(out), "--plot-points", "2", "--no-cache"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {out}" in capsys.readouterr().out


def test_gated_layers_search_their_linear_sp():
    """D and G layers use linear_sp like L: the search offers every linear method (LASP-1 on the contiguous
    layout) and the per-layer-type simulation keeps the method (it used to reset it to lasp2)."""
    from dataclasses import replace

    from lctrain.plan.search import candidate_layouts
    from lctrain.plan.simulate import SimSpec, layer_variant

    cfg = replace(load_config("configs/tiny.yaml").model, layer_pattern="DDDA")
    got = candidate_layouts(cfg, 4, 4, 256, tps=[1], cps=[4], softmax_sps=["allgather"])
    assert {(layout, lsp) for _, _, layout, _, lsp, _ in got} == {("zigzag", "lasp2"), ("contiguous", "lasp1"),
                                                                  ("zigzag", "lasp2_tree")}
    spec = SimSpec(replace(cfg, linear_sp="lasp1"), cp=4, cp_layout="contiguous", seq_len=256)
    assert layer_variant(spec, "D", 1).model.linear_sp == "lasp1"
    assert layer_variant(spec, "A", 1).model.linear_sp == "lasp2"  # cannot differ: shares a cache key


def test_window_layers_search_their_window_sp():
    """A model with sliding-window (W) layers searches halo / all-gather / ring for them (and only then); each row
    and the table name the method."""
    from dataclasses import replace

    from lctrain.plan.cli import _fmt_row
    from lctrain.plan.search import candidate_layouts, search
    from lctrain.plan.hardware import get_hardware

    base = load_config("configs/tiny.yaml").model
    plain = candidate_layouts(base, 2, 2, 256, tps=[1], cps=[2], softmax_sps=["allgather"], linear_sps=["lasp2"])
    assert {w for *_, w in plain} == {base.window_sp}
    cfg = replace(base, layer_pattern="LWLA", window_size=16)
    got = candidate_layouts(cfg, 2, 2, 256, tps=[1], cps=[2], softmax_sps=["allgather"], linear_sps=["lasp2"])
    assert sorted(w for *_, w in got) == ["allgather", "halo", "ring"]
    rows = search(cfg, 2, 2, 256, get_hardware("h100"), tps=[1], cps=[2], softmax_sps=["allgather"],
                  linear_sps=["lasp2"], checkpointing=["none"], zero_stages=[1])
    assert sorted(r.window_sp for r in rows) == ["allgather", "halo", "ring"]
    assert all(f"W:{r.window_sp}" in _fmt_row(r) for r in rows)
