"""LASP-2 equals naive linear attention on the unsharded sequence (output and every gradient), with one
all-gather forward and one backward whose size does not depend on the sequence length.

Every configuration of a world size runs inside one `run_distributed` call (spawning ranks is the slow part).
"""
import pytest
import torch
import torch.distributed as dist

import lctrain.ops.linear_attention as la
from lctrain.ops.debug import debug_checks
from lctrain.ops.linear_attention import register_linear_attention_backend, use_linear_attention_backend
from lctrain.ops.linear_attention_ref import linear_attention_ref
from lctrain.parallel import MeshConfig, comm, init_mesh, shard_sequence
from lctrain.sp import lasp1_linear_attention, lasp2_linear_attention
from lctrain.sp.utils import clear_agreement_cache
from lctrain.testing import run_distributed
from lctrain.testing.compare import assert_close

#: (decay, causal, layout, dtype); decay is None, "fixed" (a buffer) or "learned" (requires grad).
CONFIGS = [(decay, True, layout, torch.float64) for decay in (None, "fixed", "learned")
           for layout in ("contiguous", "zigzag")]
CONFIGS += [(None, False, layout, torch.float64) for layout in ("contiguous", "zigzag")]
CONFIGS += [("learned", True, "zigzag", torch.float32), (None, False, "contiguous", torch.float32),
            ("fixed", True, "zigzag", torch.bfloat16)]


def reference(q, k, v, log_decay, causal):
    """Naive linear attention on the full sequence; non-causal is q . (sum_s k_s^T v_s)."""
    if causal:
        return linear_attention_ref(q, k, v, log_decay)[0]
    return torch.einsum("bshk,bhkv->bshv", q, torch.einsum("bshk,bshv->bhkv", k, v))


def make_inputs(gen, b, s, h, dk, dv, decay, dtype=torch.float64):
    q, k, v = (torch.randn(b, s, h, d, generator=gen, dtype=torch.float64) for d in (dk, dk, dv))
    log_decay = None
    if decay is not None:
        # Strong decays (lambda down to ~0.4) so that cross-rank terms are small but far from negligible.
        log_decay = -(0.05 + 0.9 * torch.rand(h, generator=gen, dtype=torch.float64))
    cast = [x.to(dtype) for x in (q, k, v)] + [log_decay.to(dtype) if log_decay is not None else None]
    return cast


def check_against_reference(fn, cfg, seed, layout_kw=True, b=2, s_per_rank=6, h=2, dk=3, dv=4):
    """Run `fn` on this rank's shard and compare output and gradients to the reference; return the recorder."""
    decay, causal, layout, dtype = cfg
    world, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(seed)  # identical full tensors on every rank
    q, k, v, log_decay = make_inputs(gen, b, s_per_rank * world, h, dk, dv, decay, dtype)
    w = torch.randn(b, s_per_rank * world, h, dv, generator=gen, dtype=torch.float64)

    ref_in = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref_ld = log_decay.detach().double().requires_grad_(decay == "learned") if log_decay is not None else None
    ref_o = reference(*ref_in, ref_ld, causal)
    ref_grads = torch.autograd.grad((ref_o * w).sum(), ref_in + ([ref_ld] if decay == "learned" else []))

    loc = [shard_sequence(x, dim=1, layout=layout).detach().requires_grad_(True) for x in (q, k, v)]
    ld = log_decay.detach().requires_grad_(decay == "learned") if log_decay is not None else None
    kwargs = {"layout": layout} if layout_kw else {}
    with comm.record_comm() as rec:
        o = fn(*loc, ld, causal=causal, **kwargs)
        (o.double() * shard_sequence(w, dim=1, layout=layout)).sum().backward()

    tol = {torch.float64: {}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}.get(dtype, {"rtol": 2e-2, "atol": 2e-2})
    where = f"rank {rank}/{world} {cfg}"
    assert o.dtype == dtype and o.shape == (b, s_per_rank, h, dv), where
    assert_close(o.double(), shard_sequence(ref_o, dim=1, layout=layout).detach(), f"o {where}", **tol)
    for name, x, g in zip("qkv", loc, ref_grads):
        assert x.grad.dtype == dtype, where
        assert_close(x.grad.double(), shard_sequence(g, dim=1, layout=layout), f"d{name} {where}", **tol)
    if decay == "learned":
        # Each rank holds its own contribution; the sum over the CP group is the full gradient.
        d_ld = comm.all_reduce(ld.grad.double().clone())
        assert_close(d_ld, ref_grads[3], f"dlog_decay {where}", **tol)
    elif ld is not None:
        assert ld.grad is None, where
    return rec


def _lasp2_all_configs(seed):
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    for i, cfg in enumerate(CONFIGS):
        rec = check_against_reference(lasp2_linear_attention, cfg, seed + i)
        n_loc = 2 if cfg[1] and cfg[2] == "zigzag" else 1
        # States travel in float32 whatever the input dtype (float64 for float64 inputs).
        state_bytes = n_loc * 2 * 2 * 3 * 4 * (8 if cfg[3] == torch.float64 else 4)
        if world == 1:
            assert rec.summary() == {}, rec.summary()
        else:
            # Exactly one all-gather each way, nothing else on the wire but the one agreement exchange of a new
            # call signature (steady state: tests/sp/test_hot_path.py); states in float32 (float64 for float64).
            calls = {op: v["calls"] for op, v in rec.summary().items()}
            assert calls.pop("all_gather_object", 0) <= 1 and calls == {"all_gather": 2}, (cfg, rec.summary())
            assert rec.calls("all_gather", "lasp2.fwd") == 1 and rec.calls("all_gather", "lasp2.bwd") == 1
            if cfg[1]:
                assert rec.bytes(tag="lasp2.fwd") == rec.bytes(tag="lasp2.bwd") == state_bytes, (cfg, rec.events)

    # The local pass goes through the backend dispatch (so a kernel plugs in): force a counting backend.
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return linear_attention_ref(*args, **kwargs)

    register_linear_attention_backend("counting", counting)
    try:
        with use_linear_attention_backend("counting"):
            check_against_reference(lasp2_linear_attention, ("learned", True, "zigzag", torch.float64), seed - 1)
    finally:
        la.REGISTRY.unregister("counting")
    # One call forward (both chunks of the zigzag slice stacked in the batch) and one in backward, which
    # recomputes the local pass instead of keeping its graph (fla's memory model: inputs kept, intra-chunk terms
    # recomputed).
    assert calls == [(4, 3, 2, 3)] * 2, calls
    return True


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_lasp2_matches_reference(world):
    seed = int(torch.randint(0, 2**31, ()).item())
    assert all(run_distributed(_lasp2_all_configs, world, seed))


def _lasp2_on_triton(seed):
    """The Triton lightning-attention backend plugs into LASP-2 (Triton's interpreter on CPU)."""
    import os

    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with use_linear_attention_backend("triton"):
            check_against_reference(lasp2_linear_attention, ("learned", True, "zigzag", torch.float32), seed)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return True


def test_lasp2_with_triton_backend():
    pytest.importorskip("lctrain.kernels.lightning_attention")
    seed = int(torch.randint(0, 2**31, ()).item())
    assert all(run_distributed(_lasp2_on_triton, 2, seed))


def _bytes_vs_length(seed):
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    out = {}
    for layout in ("contiguous", "zigzag"):
        for s_per_rank in (4, 32):  # the sequence grows 8x
            gen = torch.Generator().manual_seed(seed)
            q, k, v, ld = make_inputs(gen, 1, s_per_rank * world, 2, 3, 4, "fixed", torch.float32)
            loc = [shard_sequence(x, dim=1, layout=layout).requires_grad_(True) for x in (q, k, v)]
            with comm.record_comm() as rec:
                lasp2_linear_attention(*loc, ld, layout=layout).sum().backward()
            out[(layout, s_per_rank)] = (rec.calls("all_gather", "lasp2.fwd"), rec.bytes(tag="lasp2.fwd"),
                                         rec.calls("all_gather", "lasp2.bwd"), rec.bytes(tag="lasp2.bwd"))
    return out


def test_lasp2_bytes_do_not_grow_with_sequence():
    seed = int(torch.randint(0, 2**31, ()).item())
    for out in run_distributed(_bytes_vs_length, 2, seed):
        for layout, n_loc in (("contiguous", 1), ("zigzag", 2)):
            state = n_loc * 1 * 2 * 3 * 4 * 4  # float32 [n_loc, b, h, dk, dv]
            assert out[(layout, 4)] == out[(layout, 32)] == (1, state, 1, state), out


def _with_debug_checks(fn, *args, **kwargs):
    with debug_checks():
        return fn(*args, **kwargs)


def _bad_inputs(kind):
    """Every rank builds (possibly different) bad inputs; return the errors and prove the group still works."""
    world, rank = dist.get_world_size(), dist.get_rank()
    init_mesh(MeshConfig(cp=world))
    b, h, dk, dv, s = 1, 2, 3, 4, 4
    fn = lasp2_linear_attention if kind == "lasp2" else lasp1_linear_attention
    layout_kw = {} if kind == "lasp1" else {"layout": "contiguous"}

    def inputs(s=s, dk=dk):
        return torch.randn(b, s, h, dk), torch.randn(b, s, h, dk), torch.randn(b, s, h, dv)

    cases = {
        "odd zigzag": lambda: fn(*inputs(s=3), layout="zigzag") if kind == "lasp2" else None,
        "uneven split": lambda: fn(*inputs(s=4 if rank == 0 else 3), **layout_kw),
        # Decay values are only checked under the debug switch (the check synchronises the device).
        "positive decay": lambda: _with_debug_checks(fn, *inputs(), torch.tensor([-0.1, 0.2 if rank == 0 else -0.2]),
                                                     **layout_kw),
        "decay non-causal": lambda: fn(*inputs(), torch.tensor([-0.1, -0.2]), causal=False, **layout_kw),
        "dk mismatch": lambda: fn(*inputs(dk=3 if rank == 0 else 5), **layout_kw),
        "q/k mismatch": lambda: fn(torch.randn(b, s, h, dk), torch.randn(b, s, h, dk + 1), torch.randn(b, s, h, dv),
                                   **layout_kw),
        "bad layout": lambda: fn(*inputs(), layout="striped") if kind == "lasp2" else None,
    }
    errors = {}
    for name, call in cases.items():
        # Ranks agree on a signature once and then trust it; a rank whose inputs change while the others keep a
        # signature they already agreed on is a divergence the group timeout catches. Each case here is the
        # first call of its signature on every rank.
        clear_agreement_cache()
        try:
            call()
            errors[name] = None
        except ValueError as err:
            errors[name] = str(err)
        # The group must still be in step: a valid call right after every error.
        q, k, v = inputs()
        fn(q, k, v, **layout_kw).sum()
    return errors


EXPECTED = {
    "odd zigzag": "not divisible by 2\\*CP = 4",
    "uneven split": "differ between CP ranks.*divisible by CP = 2",
    "positive decay": "rank 0 of the CP group: log_decay must be <= 0",
    "decay non-causal": "only defined for causal",
    "dk mismatch": "differ between CP ranks",
    "q/k mismatch": "q and k must be",
    "bad layout": "unknown CP layout",
}


@pytest.mark.parametrize("kind", ["lasp2", "lasp1"])
def test_bad_inputs_fail_clearly_on_every_rank(kind):
    import re

    for rank, errors in enumerate(run_distributed(_bad_inputs, 2, kind)):
        for name, pattern in EXPECTED.items():
            if kind == "lasp1" and name in ("odd zigzag", "bad layout"):
                continue
            assert errors[name] is not None and re.search(pattern, errors[name]), (kind, rank, name, errors[name])
