"""The fla backends of the gated ops, without fla or a GPU: importing lctrain never imports fla; automatic
dispatch never picks fla for CPU tensors; with a stand-in `fla` package (and CUDA reported available) the
adapters call fla's chunk functions with lctrain's layout, scale, initial state and final-state flag."""
from __future__ import annotations

import importlib.machinery
import subprocess
import sys
import types

import pytest
import torch

from lctrain.ops import gated_fla
from lctrain.ops.gated_delta import gated_delta_rule, select_gated_delta_backend
from lctrain.ops.gated_delta_ref import gated_delta_rule_recurrent
from lctrain.ops.gla import gated_linear_attention, select_gla_backend
from lctrain.ops.gla_ref import gla_recurrent
from tests.ops.gated_cases import make_gate, make_qkv, per_head_close


def test_importing_lctrain_does_not_import_fla():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'fla' or name.startswith('fla.'):\n"
            "            raise ImportError('fla imported at import time')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import torch, lctrain.ops.gla, lctrain.ops.gated_delta, lctrain.sp\n"
            "q = torch.randn(1, 5, 2, 3)\n"
            "lctrain.ops.gla.gated_linear_attention(q, q, q, -torch.rand(1, 5, 2))\n"
            "assert not any(m == 'fla' or m.startswith('fla.') for m in sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cpu_dispatch_never_picks_fla(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gated_fla.importlib.util, "find_spec", lambda name: object())
    assert gated_fla.fla_available()
    q = torch.zeros(1, 4, 2, 3, dtype=torch.bfloat16)
    g = torch.zeros(1, 4, 2)
    assert not gated_fla.fla_supports_gla(q, q, q, g) and not gated_fla.fla_supports_delta(q, q, q, g, g)
    assert select_gla_backend(q, q, q, g) == "chunk"
    assert select_gated_delta_backend(q, q, q, g, g) == "chunk"


def test_fla_unavailable_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not gated_fla.fla_available()
    q = torch.zeros(1, 4, 2, 3)
    with pytest.raises(ValueError, match="not available"):
        gated_linear_attention(q, q, q, None, backend="fla")


@pytest.fixture
def fake_fla(monkeypatch):
    """A stand-in `fla` package whose chunk functions record their arguments and run lctrain's references."""
    calls = []

    def module(name):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    def check_layout(q, k, v, initial_state):
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
        assert initial_state is None or initial_state.dtype == torch.float32

    def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None):
        check_layout(q, k, v, initial_state)
        calls.append(("simple_gla", tuple(g.shape) if g is not None else None, scale, output_final_state))
        return gla_recurrent(q, k, v, g, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state)

    def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
        check_layout(q, k, v, initial_state)
        calls.append(("gla", tuple(g.shape), scale, output_final_state))
        return gla_recurrent(q, k, v, g, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state)

    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None):
        check_layout(q, k, v, initial_state)
        calls.append(("gated_delta_rule", tuple(g.shape), scale, output_final_state))
        return gated_delta_rule_recurrent(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                          output_final_state=output_final_state)

    module("fla")
    module("fla.ops")
    module("fla.ops.simple_gla").chunk_simple_gla = chunk_simple_gla
    module("fla.ops.gla").chunk_gla = chunk_gla
    module("fla.ops.gated_delta_rule").chunk_gated_delta_rule = chunk_gated_delta_rule
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls


@pytest.mark.parametrize("kind", ["none", "head", "scalar", "vector"])
def test_fla_gla_adapter(fake_fla, kind):
    gen = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(gen, 2, 9, 3, 4, 5)
    g = make_gate(kind, gen, 2, 9, 3, 4)
    s0 = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    o, f = gated_linear_attention(q, k, v, g, scale=0.5, initial_state=s0, output_final_state=True, backend="fla")
    o_ref, f_ref = gla_recurrent(q, k, v, g, scale=0.5, initial_state=s0, output_final_state=True)
    per_head_close(o, o_ref, 2, 1e-6, "o")  # the adapter hands fla a float32 state
    per_head_close(f, f_ref, 1, 1e-6, "final")
    gshape = {"none": None, "head": (2, 9, 3), "scalar": (2, 9, 3), "vector": (2, 9, 3, 4)}[kind]
    assert fake_fla == [("gla" if kind == "vector" else "simple_gla", gshape, 0.5, True)]


def test_fla_gated_delta_adapter(fake_fla):
    gen = torch.Generator().manual_seed(2)
    q, k, v = make_qkv(gen, 2, 9, 3, 4, 5, normalize_k=True)
    g = make_gate("scalar", gen, 2, 9, 3, 4)
    beta = torch.rand(2, 9, 3, generator=gen, dtype=torch.float64)
    o, f = gated_delta_rule(q, k, v, g, beta, scale=0.5, backend="fla")
    o_ref, _ = gated_delta_rule_recurrent(q, k, v, g, beta, scale=0.5)
    per_head_close(o, o_ref, 2, 1e-6, "o")  # the adapter hands fla float32 gates
    assert f is None
    assert fake_fla == [("gated_delta_rule", (2, 9, 3), 0.5, False)]


def test_gpu_ranking_follows_the_gpu_record(monkeypatch, tmp_path):
    """Before any GPU run (no record) no backend is validated_on_gpu, fla's adapters included; on GPU tensors the
    registry then ranks the claimed ones (fla: the maintained library's kernels; the plain-PyTorch forms) by
    priority, fla first. gpu-check's record decides afterwards: a failed fla run puts fla last, a passing chunk
    run puts chunk first."""
    from lctrain.ops import gated_delta, gla
    from lctrain.ops.registry import meta_as_gpu, record_gpu_validation

    record = tmp_path / "gpu_validated.json"
    monkeypatch.setenv("LCTRAIN_GPU_RECORD", str(record))
    q = torch.empty(1, 4, 2, 8, device="meta")
    for registry in (gla.REGISTRY, gated_delta.REGISTRY):
        backends = registry.backends()
        assert not any(be.validated_on_gpu for be in backends.values()), registry.kind
        assert list(backends)[0] == "fla", list(backends)
        with meta_as_gpu():
            assert [be.name for be in registry.candidates(q, q, q, None, None)][0] == "fla"
        record_gpu_validation({f"{registry.kind}/fla": False, f"{registry.kind}/chunk": True}, "test GPU", record)
        with meta_as_gpu():
            order = [be.name for be in registry.candidates(q, q, q, None, None)]
        assert order[0] == "chunk" and order[-1] == "fla", order
        assert registry.backends()["chunk"].validated_on_gpu and not registry.backends()["fla"].validated_on_gpu
        assert [be.name for be in registry.candidates(q, q, q, None, None)][0] == "fla"  # not a GPU: priority
