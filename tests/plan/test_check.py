"""The predicted-memory pre-reservation check (lctrain.plan.check through lctrain.preflight)."""
from __future__ import annotations

from lctrain.config import load_config
from lctrain.preflight import Target, preflight


def test_memory_check_flags_a_job_that_cannot_fit(monkeypatch, tmp_path):
    monkeypatch.setenv("LCTRAIN_PLAN_CACHE", str(tmp_path))
    cfg = load_config("configs/llama3-8b.yaml", ["parallel.cp=8", "data.seq_len=2097152", "train.global_batch_size=1"])
    problems = preflight(cfg, Target.of(8, 8, hardware="h100"))
    assert any("predicted memory per GPU" in p and "exceeds the h100" in p for p in problems), problems
    assert not any("predicted memory" in p for p in preflight(cfg, Target.of(8, 8)))  # no device known: skipped


def test_memory_check_passes_a_small_job_and_names_unknown_hardware(monkeypatch, tmp_path):
    monkeypatch.setenv("LCTRAIN_PLAN_CACHE", str(tmp_path))
    cfg = load_config("configs/tiny.yaml", ["parallel.cp=2"])
    assert not any("memory" in p for p in preflight(cfg, Target.of(2, 2, hardware="a100-80g")))
    monkeypatch.setenv("LCTRAIN_HARDWARE", "tpu-v9")
    assert any("unknown hardware 'tpu-v9'" in p for p in preflight(cfg, Target.of(2, 2)))


def test_memory_check_simulates_the_activations_when_no_plan_is_cached(monkeypatch, tmp_path):
    """Linear-Llama3-1B at 32K tokens per GPU without checkpointing: the block inputs (the old lower bound,
    ~2 GB) fit an A100, the simulated step does not; the check now simulates it (no cached plan) and says so."""
    monkeypatch.setenv("LCTRAIN_PLAN_CACHE", str(tmp_path))
    cfg = load_config("configs/linear-llama3-1b.yaml", ["parallel.cp=8", "data.seq_len=262144",
                                                         "train.global_batch_size=1"])
    problems = [p for p in preflight(cfg, Target.of(8, 8, hardware="a100-80g")) if "predicted memory" in p]
    assert len(problems) == 1 and "simulated now" in problems[0], problems
    need = float(problems[0].split("predicted memory per GPU ")[1].split(" GB")[0])
    assert need > 80
    # With full checkpointing the same job fits.
    cfg.model.activation_checkpointing = "full"
    assert not any("predicted memory" in p for p in preflight(cfg, Target.of(8, 8, hardware="a100-80g")))
