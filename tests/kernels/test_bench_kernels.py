"""The kernel benchmark's FLOP formulas (against brute-force counts) and its refusal without a GPU."""
import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seq_q,seq_k", [(4, 4), (2, 4), (4, 2), (37, 37), (16, 50)])
@pytest.mark.parametrize("causal", [True, False])
def test_visible_pairs_counts_the_mask(bench, seq_q, seq_k, causal):
    i = torch.arange(seq_q)[:, None]
    j = torch.arange(seq_k)[None, :]
    mask = (j <= i + seq_k - seq_q) if causal else torch.ones(seq_q, seq_k, dtype=torch.bool)
    assert bench.visible_pairs(seq_q, seq_k, causal) == int(mask.sum())


def test_attention_flops(bench):
    # causal square: 4 * b * h * d * n(n+1)/2; backward adds 2.5x the forward
    assert bench.attention_flops(2, 3, 8, 8, 16, True) == 4 * 2 * 3 * 16 * 36
    assert bench.attention_flops(1, 1, 8, 8, 16, False, backward=True) == 3.5 * 4 * 16 * 64


def test_lightning_flops(bench):
    seq, dk, dv, chunk = 150, 16, 32, 64
    starts = torch.arange(seq) // chunk
    t = torch.arange(seq)
    intra_pairs = int(((t[None, :] <= t[:, None]) & (starts[:, None] == starts[None, :])).sum())
    expected = 2 * 3 * (2 * (dk + dv) * intra_pairs + 4 * seq * dk * dv)
    assert bench.lightning_flops(2, 3, seq, dk, dv, chunk=chunk) == expected
    assert bench.lightning_flops(2, 3, seq, dk, dv, backward=True, chunk=chunk) == 4 * expected


def test_format_row_reports_throughput_and_ratio(bench):
    row = dict(op="flash", d=64, heads=2, batch=1, seq=1024, mode="fwd", flops=2e12, tokens=1024, ours=10.0, peer=12.0,
               peer_name="sdpa-flash")
    cells = [c.strip() for c in bench.format_row(row).strip("|").split("|")]
    assert cells[4:] == ["10.000", "200.0", "1.02e+05", "sdpa-flash", "12.000", "166.7", "1.20"]


def test_goals_report_ratios_against_the_strongest_peer(bench):
    def row(op, seq, mode, ours, peer, d=128):
        return dict(op=op, d=d, heads=16, batch=1, seq=seq, mode=mode, flops=1.0, tokens=seq, ours=ours, peer=peer,
                    peer_name="fla-chunk" if op == "lightning" else "flash-attn")
    rows = [row("flash", 4096, "fwd", 1.0, 0.9), row("flash", 4096, "fwd+bwd", 4.0, 3.3),
            row("lightning", 4096, "fwd+bwd", 2.0, 2.2), row("lightning", 8192, "fwd+bwd", 4.0, 4.0)]
    lines = bench.goals(rows)
    assert "flash d=128 seq=4096: fwd 0.90x flash-attn (goal >= 0.9)" in lines
    assert "flash d=128 seq=4096: bwd 0.80x flash-attn (goal >= 0.8)" in lines  # (3.3 - 0.9) / (4 - 1)
    assert "lightning d=128: fwd+bwd tokens/s min/max over seq 1.00 (goal: flat, ~1)" in lines
    assert "lightning d=128 seq=4096: fwd+bwd 1.10x fla-chunk (goal >= 1)" in lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_gpu(bench, tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path / "t.md")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "t.md").exists()
