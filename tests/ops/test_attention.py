"""Local attention backends: the reference against plain autograd, every backend against the reference, dispatch."""
import itertools

import pytest
import torch

from lctrain.ops import attention as attn_mod
from lctrain.ops.attention import (attention, attention_backends, attention_backward, attention_forward,
                                   register_attention_backend, select_backend, use_attention_backend)
from lctrain.ops.attention_ref import reference_attention_backward, reference_attention_forward
from lctrain.sp.utils import merge_attention
from lctrain.testing.compare import assert_close

SHAPES = [(12, 12), (5, 12), (12, 5), (1, 7)]  # (sq, sk): square, fewer queries, more queries, one query
HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA


def _inputs(sq, sk, h, hk, dtype, d=8, b=2):
    return (torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, sk, hk, d, dtype=dtype),
            torch.randn(b, sk, hk, d, dtype=dtype), torch.randn(b, sq, h, d, dtype=dtype))


def _plain(q, k, v, causal, scale):
    """Attention written the obvious way (repeat kv heads, bottom-right mask), for autograd."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        keep = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.nan_to_num(torch.exp(s - lse[..., None]), nan=0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq,sk", SHAPES)
@pytest.mark.parametrize("h,hk", HEADS)
def test_reference_matches_autograd_of_plain_attention(causal, sq, sk, h, hk):
    q, k, v, do = _inputs(sq, sk, h, hk, torch.float64)
    o, lse = reference_attention_forward(q, k, v, causal, 0.37)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o_plain, lse_plain = _plain(*leaves, causal, 0.37)
    o_plain.backward(do)
    assert_close(o, o_plain.detach(), "o")
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_plain))
    fin = torch.isfinite(lse_plain)
    assert_close(lse[fin], lse_plain.detach()[fin], "lse")
    for name, got, leaf in zip(("dq", "dk", "dv"), reference_attention_backward(do, q, k, v, o, lse, causal, 0.37),
                               leaves):
        assert_close(got, leaf.grad, name)


def test_rows_without_visible_keys_give_zero_output_and_minus_inf_lse():
    q, k, v, do = _inputs(9, 4, 2, 1, torch.float64)
    for name in _backends_supporting(q, k, v, True):
        o, lse = attention_forward(q, k, v, True, 0.5, backend=name)
        assert torch.equal(o[:, :5], torch.zeros_like(o[:, :5])), name
        assert torch.isneginf(lse[:, :, :5]).all() and torch.isfinite(lse[:, :, 5:]).all(), name
        assert all(torch.isfinite(g).all() for g in attention_backward(do, q, k, v, o, lse, True, 0.5, backend=name))


def _backends_supporting(q, k, v, causal):
    return [n for n, be in attention_backends().items() if be.available() and be.supports(q, k, v, causal)]


FAST = sorted(set(attention_backends()) | {"sdpa", "flash_attn", "triton"} - {"reference"})


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backend_matches_reference(name, dtype):
    be = attention_backends().get(name)
    if be is None or not be.available():
        pytest.skip(f"attention backend {name!r} is not available here")
    ran = 0
    for causal, (sq, sk), (h, hk) in itertools.product([True, False], SHAPES, HEADS):
        q, k, v, do = _inputs(sq, sk, h, hk, dtype)
        if not be.supports(q, k, v, causal):
            continue
        ran += 1
        tag = f"{name} causal={causal} sq={sq} sk={sk} h={h} hk={hk} {dtype}"
        o_ref, lse_ref = attention_forward(q, k, v, causal, 0.3, backend="reference")
        o, lse = attention_forward(q, k, v, causal, 0.3, backend=name)
        assert_close(o, o_ref, f"{tag} o")
        assert lse.dtype == lse_ref.dtype and lse.shape == lse_ref.shape, tag
        assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)), tag
        fin = torch.isfinite(lse_ref)
        assert_close(lse[fin], lse_ref[fin], f"{tag} lse")
        want = attention_backward(do, q, k, v, o_ref, lse_ref, causal, 0.3, backend="reference")
        got = attention_backward(do, q, k, v, o_ref, lse_ref, causal, 0.3, backend=name)
        for gname, a, b in zip(("dq", "dk", "dv"), got, want):
            assert a.shape == b.shape and a.dtype == b.dtype, tag
            assert_close(a, b, f"{tag} {gname}")
    if not ran:
        pytest.skip(f"attention backend {name!r} supports no {dtype} case on this device")


@pytest.mark.parametrize("name", ["reference"] + FAST)
def test_backward_accepts_merged_output_and_lse(name):
    """Split the keys in two blocks, merge the partial results, differentiate each block with the merged (o, lse)."""
    be = attention_backends().get(name)
    if be is None or not be.available():
        pytest.skip(f"attention backend {name!r} is not available here")
    q, k, v, do = _inputs(6, 10, 4, 2, torch.float64)
    if not be.supports(q, k, v, True):
        pytest.skip(f"attention backend {name!r} does not support this case here")
    o_full, lse_full = attention_forward(q, k, v, True, 0.4, backend="reference")
    # Block 1: keys [0, 4) are visible to every query (non-causal); block 2: keys [4, 10), causal bottom-right.
    blocks = [(slice(0, 4), False), (slice(4, 10), True)]
    out = torch.zeros_like(q)
    lse = torch.full_like(lse_full, float("-inf"))
    for ks, causal in blocks:
        merge_attention(out, lse, *attention_forward(q, k[:, ks], v[:, ks], causal, 0.4, backend=name))
    assert_close(out, o_full, "merged o")
    assert_close(lse, lse_full, "merged lse")
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for ks, causal in blocks:
        g = attention_backward(do, q, k[:, ks], v[:, ks], out, lse, causal, 0.4, backend=name)
        dq += g[0]
        dk[:, ks], dv[:, ks] = g[1], g[2]
    want = attention_backward(do, q, k, v, o_full, lse_full, True, 0.4, backend="reference")
    for gname, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        assert_close(a, b, gname)


def test_dispatch_picks_sdpa_on_cpu_and_can_be_forced(monkeypatch):
    q, k, v, _ = _inputs(4, 4, 2, 2, torch.float32)
    monkeypatch.delenv(attn_mod.ENV_VAR, raising=False)
    assert select_backend(q, k, v, True).name == "sdpa"
    assert select_backend(q, k, v, True, backend="reference").name == "reference"
    with use_attention_backend("reference"):
        assert select_backend(q, k, v, True).name == "reference"
        assert select_backend(q, k, v, True, backend="sdpa").name == "sdpa"
    monkeypatch.setenv(attn_mod.ENV_VAR, "reference")
    assert select_backend(q, k, v, True).name == "reference"
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        attention_forward(q, k, v, True, 1.0, backend="nope")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention_forward(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1), True, 1.0)


def test_priority_and_supports_decide_the_backend(monkeypatch, request):
    monkeypatch.delenv(attn_mod.ENV_VAR, raising=False)
    request.addfinalizer(lambda: attn_mod.REGISTRY.unregister("fast"))
    calls = []

    def fwd(q, k, v, causal, scale):
        calls.append("fast")
        return attention_backends()["reference"].forward(q, k, v, causal, scale)

    register_attention_backend("fast", fwd, reference_attention_backward,
                               lambda q, k, v, causal: not causal, priority=100)
    q, k, v, _ = _inputs(4, 4, 2, 2, torch.float64)
    attention_forward(q, k, v, False, 1.0)
    assert calls == ["fast"]
    assert select_backend(q, k, v, True).name == "sdpa"  # "fast" does not support causal
    # A forced backend is used without asking `supports`.
    attention_forward(q, k, v, True, 1.0, backend="fast")
    assert calls == ["fast", "fast"]


def test_attention_autograd_default_scale():
    q, k, v, do = _inputs(6, 6, 2, 1, torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    attention(*leaves, causal=True).backward(do)
    plain = [x.clone().requires_grad_(True) for x in (q, k, v)]
    _plain(*plain, True, 8 ** -0.5)[0].backward(do)
    for a, b in zip(leaves, plain):
        assert_close(a.grad, b.grad)


def test_on_gpu_unvalidated_backends_rank_below_validated_ones(monkeypatch, request):
    """A kernel never validated on a GPU does not outrank flash-attn / SDPA there (priority alone on CPU)."""
    from lctrain.ops import registry

    monkeypatch.delenv(attn_mod.ENV_VAR, raising=False)
    monkeypatch.delenv("LCTRAIN_ALLOW_UNVALIDATED_GPU", raising=False)
    request.addfinalizer(lambda: attn_mod.REGISTRY.unregister("new_kernel"))
    ref = attention_backends()["reference"]
    register_attention_backend("new_kernel", ref.forward, ref.backward, lambda *case: True, priority=1000)
    q, k, v, _ = _inputs(4, 4, 2, 2, torch.float64)
    assert select_backend(q, k, v, True).name == "new_kernel"  # CPU: priority decides
    monkeypatch.setattr(registry, "_on_gpu", lambda case: True)  # as if q lived on a GPU
    order = [be.name for be in attn_mod.REGISTRY.candidates(q, k, v, True)]
    assert order[:3] == ["flash_attn", "sdpa", "reference"] and set(order[3:]) >= {"new_kernel"}, order
    if "triton" in order:
        assert order.index("triton") > order.index("reference"), order
    assert select_backend(q, k, v, True).name == "sdpa"  # flash_attn is unavailable here
    monkeypatch.setenv("LCTRAIN_ALLOW_UNVALIDATED_GPU", "1")
    assert select_backend(q, k, v, True).name == "new_kernel"


def test_track_records_the_backend_that_ran(monkeypatch):
    monkeypatch.delenv(attn_mod.ENV_VAR, raising=False)
    q, k, v, _ = _inputs(4, 4, 2, 2, torch.float64)
    with attn_mod.REGISTRY.track() as names:
        attention_forward(q, k, v, True, 1.0)
        attention_forward(q, k, v, True, 1.0, backend="reference")
    assert names == ["sdpa", "reference"]


def test_broken_kernel_plugin_is_an_error_on_a_gpu_machine(tmp_path, monkeypatch):
    from lctrain.ops.registry import BackendRegistry

    (tmp_path / "lctrain_broken_plugin.py").write_text("raise ImportError('built for another CUDA')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LCTRAIN_ALLOW_KERNEL_FALLBACK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reg = BackendRegistry("test op", "LCTRAIN_TEST_BACKEND", plugins=("lctrain_broken_plugin",))
    for _ in range(2):  # every call, not only the first
        with pytest.raises(RuntimeError, match="(?s)failed to import.*another CUDA.*LCTRAIN_ALLOW_KERNEL_FALLBACK"):
            reg.backends()
    monkeypatch.setenv("LCTRAIN_ALLOW_KERNEL_FALLBACK", "1")
    with pytest.warns(UserWarning, match="failed to import"):
        assert reg.backends() == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU: a warning, never an error
    reg = BackendRegistry("test op", "LCTRAIN_TEST_BACKEND", plugins=("lctrain_broken_plugin",))
    monkeypatch.delenv("LCTRAIN_ALLOW_KERNEL_FALLBACK")
    with pytest.warns(UserWarning, match="failed to import"):
        assert reg.backends() == {}


def test_broken_flash_attn_install_is_not_swallowed_on_a_gpu_machine(monkeypatch, request):
    import importlib.util
    import sys

    from lctrain.ops import attention_flash_attn as fa

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # installed but its import fails
    monkeypatch.delenv("LCTRAIN_ALLOW_KERNEL_FALLBACK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fa._interface.cache_clear()
    request.addfinalizer(fa._interface.cache_clear)
    with pytest.raises(RuntimeError, match="flash-attn is installed but fails to import"):
        fa.available()
    monkeypatch.setenv("LCTRAIN_ALLOW_KERNEL_FALLBACK", "1")
    with pytest.warns(UserWarning, match="fails to import"):
        assert not fa.available()


def _ops_of(fn):
    """aten ops (overload names) that `fn()` dispatches, in order, with their tensor arguments' shapes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class _Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((str(func), [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
            return func(*args, **(kwargs or {}))

    with _Log():
        out = fn()
    return seen, out


@pytest.mark.parametrize("sq,sk", [(64, 64), (32, 64), (64, 32)])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_sdpa_backward_reuses_the_saved_lse_and_reads_gqa_natively(sq, sk, causal):
    """The CUDA branch, on meta tensors answering as GPU tensors (the rehearsal's seam): the flash op in forward,
    its backward from the saved (o, lse) with no forward op re-run, K/V with their kv heads (no repeat, no copy),
    dK/dV back with kv heads."""
    from lctrain.ops.registry import meta_as_gpu

    b, h, hk, d = 2, 8, 2, 64
    q = torch.empty(b, sq, h, d, device="meta", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.empty(b, sk, hk, d, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    with meta_as_gpu():
        assert select_backend(q, k, v, causal).name == "sdpa"
        fwd_ops, o = _ops_of(lambda: attention(q, k, v, causal))
        bwd_ops, _ = _ops_of(lambda: o.backward(torch.empty_like(o)))
    flash = "aten._scaled_dot_product_flash_attention.default"
    assert any(name == flash for name, _ in fwd_ops), fwd_ops
    assert not any(name == flash for name, _ in bwd_ops), bwd_ops  # no forward re-run in backward
    grads = [shapes for name, shapes in bwd_ops if name == "aten._scaled_dot_product_flash_attention_backward.default"]
    assert grads and all(shapes[2][1] == hk and shapes[3][1] == hk for shapes in grads), grads  # k, v: kv heads
    for name, _ in fwd_ops + bwd_ops:  # no GQA copy of K/V
        assert "repeat_interleave" not in name and "aten.repeat." not in name, name
    assert not any("expand" in name and shapes and shapes[0][2] == hk for name, shapes in fwd_ops + bwd_ops)
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_gpu_record_decides_validation_and_gpu_ranking(monkeypatch, tmp_path):
    """No record: nothing is validated_on_gpu and on GPU tensors the claimed backends (PyTorch's, flash-attn's)
    rank above the unclaimed Triton kernel; gpu-check's verdicts then move them (pass: first, fail: last)."""
    from lctrain.ops.registry import meta_as_gpu, read_gpu_record, record_gpu_validation

    record = tmp_path / "gpu_validated.json"
    monkeypatch.setenv("LCTRAIN_GPU_RECORD", str(record))
    reg = attn_mod.REGISTRY
    q = torch.empty(1, 4, 2, 8, device="meta", dtype=torch.bfloat16)
    with meta_as_gpu():
        order = [be.name for be in reg.candidates(q, q, q, True)]
    assert not any(be.validated_on_gpu for be in reg.backends().values())
    assert order.index("sdpa") < order.index("triton") and order.index("reference") < order.index("triton"), order
    record_gpu_validation({"attention/triton": True, "attention/sdpa": False}, "test GPU", record,
                          {"attention/triton": {"checks": 3}})
    assert read_gpu_record()["attention/triton"]["checks"] == 3
    with meta_as_gpu():
        order = [be.name for be in reg.candidates(q, q, q, True)]
        assert select_backend(q, q, q, True).name == "triton"
    assert order[0] == "triton" and order[-1] == "sdpa", order
    assert reg.backends()["triton"].validated_on_gpu and not reg.backends()["sdpa"].validated_on_gpu
    record.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable GPU record"):
        assert not reg.validated_on_gpu("triton")
