"""lctrain rehearse: shipped configs at their GPU counts, planted defects named by line, exact state bytes."""
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from lctrain.config import load_config
from lctrain.models.flops import num_parameters
from lctrain.rehearse import rehearse


def _intended_gpus(path: Path) -> int:
    found = re.search(r"^# Intended GPUs: (\d+)", path.read_text(), re.M)
    assert found, f"{path} must say its GPU count ('# Intended GPUs: N'): every shipped config is rehearsed at it"
    return int(found.group(1))


#: Every shipped config and the GPU count it is meant for (the config file says so): one node or less runs in the
#: fast set, the rest are slow.
SHIPPED = sorted((p.stem, _intended_gpus(p)) for p in (Path(__file__).parents[2] / "configs").glob("*.yaml"))
SMALL = [(name, gpus) for name, gpus in SHIPPED if gpus <= 8]
LARGE = [(name, gpus) for name, gpus in SHIPPED if gpus > 8]


def _check_shipped(name: str, gpus: int, quick: bool = False) -> None:
    # A multi-node job needs an out_dir every node mounts (preflight refuses the shipped relative ones).
    over = [f"run.out_dir=/shared/runs/{name}"] if gpus > 8 else []
    if quick:  # one micro-batch per step and one eval batch: the same peak, a fraction of the time
        cfg = load_config(f"configs/{name}.yaml")
        dp = gpus // (cfg.parallel.tp * cfg.parallel.cp)
        over += [f"train.global_batch_size={dp * cfg.train.micro_batch_size}", "train.eval_batches=1"]
    cfg = load_config(f"configs/{name}.yaml", over)
    r = rehearse(cfg, gpus=gpus, steps=2)
    # Every shipped config passes outright: no host sync, no CPU tensor, and no fp32 matmul under bf16 (state-only
    # float32 math is marked fp32_by_design and only reported, lctrain.ops.precision).
    assert r.ok and not r.findings, r.findings
    assert len(r.layers) == cfg.model.num_layers
    # Packed softmax layers and window ("W") layers run their own masked path (FlexAttention on a GPU), not a
    # registry backend.
    packed = cfg.data.source == "text" and cfg.data.document_mask
    assert all(L.backends for L in r.layers if L.mixer != "W" and not (packed and L.mixer == "A")), r.layers
    assert r.peak_bytes >= r.states_bytes > 0 and r.activations_bytes > 0
    assert r.peak_bytes <= r.states_bytes + r.activations_bytes + r.comm_buffer_bytes
    if cfg.parallel.cp > 1:
        assert any(c.group == "cp" for c in r.collectives_per_step)


@pytest.mark.parametrize("name,gpus", SMALL)
def test_small_shipped_configs_rehearse(name, gpus):
    _check_shipped(name, gpus)


@pytest.mark.slow
@pytest.mark.parametrize("name,gpus", LARGE)
def test_large_shipped_configs_rehearse(name, gpus):
    _check_shipped(name, gpus, quick=True)


# ---- planted defects: each must fail the rehearsal and name this file's line


def _planted(monkeypatch, defect):
    from lctrain.models import hybrid

    forward = hybrid.Block.forward

    def planted(self, x, *args, **kwargs):
        defect(x)
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(hybrid.Block, "forward", planted)
    # seq 32 on one CP rank: a token-sized product is [32, 32], not a head-dim state (16 x 16)
    cfg = load_config("configs/tiny.yaml", ["train.dtype=bfloat16"])
    return rehearse(cfg, gpus=2, steps=2)


def _line_of(fn) -> str:
    return f"tests/rehearse/test_rehearsal.py:{fn.__code__.co_firstlineno + 1}"


def _cpu_collective(x):
    torch.distributed.all_reduce(torch.zeros(2))


def _item(x):
    x.sum().item()


def _isin(x):
    torch.isin(x[0, :, 0].long(), torch.arange(100, device=x.device))


def _fp32_matmul(x):
    x.float() @ x.float().transpose(-1, -2)


def _host_tensor(x):
    x * torch.ones(x.shape[-1], dtype=x.dtype)


@pytest.mark.parametrize("defect,kind", [(_cpu_collective, "cpu_collective"), (_item, "host_sync"),
                                         (_isin, "host_sync"), (_fp32_matmul, "fp32_matmul"),
                                         (_host_tensor, "cpu_tensor_in_device_op")])
def test_planted_defect_fails_naming_its_line(monkeypatch, defect, kind):
    r = _planted(monkeypatch, defect)
    assert not r.ok
    lines = {(f["kind"], f["line"]) for f in r.findings}
    assert (kind, _line_of(defect)) in lines, r.findings


def test_sync_in_the_first_step_is_allowed_but_listed(monkeypatch):
    from lctrain.models import hybrid

    forward, seen = hybrid.Block.forward, []

    def once(self, x, *args, **kwargs):
        if not seen:
            seen.append(1)
            x.sum().item()  # warm-up only: the first step may sync
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(hybrid.Block, "forward", once)
    r = rehearse(load_config("configs/tiny.yaml", ["train.dtype=bfloat16"]), gpus=2, steps=2)
    assert not [f for f in r.findings if f["kind"] != "fp32_matmul"], r.findings
    assert any(s["line"].startswith("tests/rehearse/test_rehearsal.py") and s["phase"] == "step 1"
               for s in r.syncs_allowed)


# ---- exact bytes


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_state_bytes_per_zero_stage_are_exact(stage):
    """Hand-checkable: P parameters, W = DP x CP = 8 ranks, p = ceil(P / W); bf16 (fp32 for ZeRO-0)."""
    dtype = "float32" if stage == 0 else "bfloat16"
    cfg = load_config("configs/tiny.yaml", [f"train.zero_stage={stage}", f"train.dtype={dtype}", "parallel.cp=2"])
    r = rehearse(cfg, gpus=8, steps=2)
    P, W = num_parameters(cfg.model), 8  # cp 2 x dp 4: ZeRO shards over DP x CP
    p = math.ceil(P / W)
    expected = {0: 4 * P + 4 * P + 2 * 4 * P,            # fp32 params, grads, Adam moments
                1: 2 * P + 2 * P + 3 * 4 * p,            # bf16 params and grads; fp32 master + moments sharded
                2: 2 * P + 4 * p + 3 * 4 * p,            # the fp32 gradient partition instead of full grads
                3: 2 * p + 4 * p + 3 * 4 * p}[stage]     # parameters sharded too
    assert r.states_bytes == expected
    per_step = {(c.op, c.group): c for c in r.collectives_per_step}
    if stage in (1, 2):  # the updated partitions, gathered once per step
        assert per_step[("all_gather_single", "dp_cp")].bytes == 2 * p


# ---- the steady state of every SP method x gate kind x packed documents issues no syncing op

SP_CASES = [("allgather", "lasp2", "zigzag"), ("ring", "lasp2", "zigzag"), ("ulysses", "lasp1", "contiguous")]


@pytest.mark.slow
@pytest.mark.parametrize("packed", [True], ids=["packed"])
@pytest.mark.parametrize("softmax_sp,linear_sp,layout", SP_CASES)
def test_steady_state_has_no_sync_for_every_sp_method(softmax_sp, linear_sp, layout, packed, tmp_path):
    """Linear ("L"), gated delta ("D"), GLA ("G") and softmax ("A") layers over CP = 2, packed documents (a text
    corpus that is not prepared here: documents from the stated default length distribution). Whole sequences: the
    shipped configs above (allgather + lasp2 LLLA/LA/DDDA) and tests/sp/test_hot_path.py's per-method matrix."""
    data = ([f"data.source=text", f"data.path={tmp_path}", "data.seq_len=256"] if packed
            else ["data.seq_len=64"])
    cfg = load_config("configs/tiny.yaml", ["model.layer_pattern=LDGA", f"model.softmax_sp={softmax_sp}",
                                            f"model.linear_sp={linear_sp}", f"parallel.cp_layout={layout}",
                                            "parallel.cp=2", "model.num_heads=2", "model.num_kv_heads=2"] + data)
    r = rehearse(cfg, gpus=4, steps=2)
    assert not [f for f in r.findings if f["kind"] != "fp32_matmul"], r.findings
    assert {L.mixer for L in r.layers} == set("LDGA")


# ---- the trainer's control-plane collectives on a group without a CPU backend


def test_trainer_control_collectives_run_on_a_group_without_cpu_backend():
    """The resume broadcast, the preemption agreement and the eval totals use device tensors: on meta:fake (no CPU
    backend, as NCCL) each is issued and none is refused."""
    r = rehearse(load_config("configs/tiny.yaml", ["train.preempt_grace_s=60"]), gpus=4, steps=2)
    assert not [f for f in r.findings if f["kind"] != "fp32_matmul"], r.findings
    ops = {p: {(c.op, c.group) for c in cs} for p, cs in r.collectives_by_phase.items()}
    assert ("broadcast", "world") in ops["setup"]          # choose_checkpoint
    assert ("all_reduce", "world") in ops["log"]           # _Preemption.agreed
    assert ("all_reduce", "dp_cp") in ops["eval"]          # evaluate's totals


def test_a_host_tensor_in_the_resume_broadcast_is_named(monkeypatch):
    """The defect this issue fixed, put back: choose_checkpoint's tensor on the host."""
    from lctrain.train import trainer

    choose = trainer.choose_checkpoint
    monkeypatch.setattr(trainer, "choose_checkpoint", lambda resume, root, device=None: choose(resume, root))
    r = rehearse(load_config("configs/tiny.yaml"), gpus=2, steps=2)
    hit = [f for f in r.findings if f["kind"] == "cpu_collective"]
    assert hit and hit[0]["line"].startswith("lctrain/train/trainer.py:") and hit[0]["phase"] == "setup", r.findings
