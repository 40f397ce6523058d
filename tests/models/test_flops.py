"""Parameter count and FLOPs per token: a hand-computed case, and the count against the real (gathered) model."""
import dataclasses

import pytest

from lctrain.models import ModelConfig, build_model, flops_per_token, num_parameters
from lctrain.models.tensor_parallel import gather_full_parameters
from lctrain.parallel import MeshConfig, init_mesh
from lctrain.testing import run_distributed

# V=10, H=4, h=2 heads, g=1 kv head, d=2, F=6, layers "LA".
TINY = ModelConfig(vocab_size=10, hidden_size=4, num_layers=2, num_heads=2, num_kv_heads=1, ffn_hidden_size=6,
                   layer_pattern="LA")


def test_num_parameters_by_hand():
    embed_out_norm = 10 * 4 + 10 * 4 + 4  # embedding, output layer, final norm = 84
    qkv, out, mlp, norms = 4 * (2 + 2 * 1) * 2, 2 * 2 * 4, 3 * 4 * 6, 2 * 4  # 32, 16, 72, 8
    linear = qkv + out + mlp + norms + 4 * 2 * 2 + 2 * 2  # + gate 16 + per-head output norm 4 = 148
    softmax = qkv + out + mlp + norms  # 128
    assert num_parameters(TINY) == embed_out_norm + linear + softmax == 360
    assert num_parameters(dataclasses.replace(TINY, tie_embeddings=True)) == 360 - 40
    assert num_parameters(dataclasses.replace(TINY, linear_output_gate="none", linear_output_norm=False)) == 340


def test_flops_per_token_by_hand():
    seq = 8
    # Forward matmuls, 2 FLOPs per weight: output layer 40 + linear layer 32+16+72+16 + softmax layer 32+16+72.
    dense = 2 * (40 + 136 + 120)  # 592
    softmax_mixing = 2 * 2 * 2 * seq  # 2 h d T (causal: T/2 keys on average, q.k and p.v) = 64
    linear_mixing = 4 * 2 * 2 * 2  # 4 h d^2 (state update + read-out) = 32
    assert flops_per_token(TINY, seq) == 3 * (dense + softmax_mixing + linear_mixing) == 2064.0
    # The softmax term grows with the sequence, the linear one does not.
    assert flops_per_token(TINY, 2 * seq) - flops_per_token(TINY, seq) == 3 * softmax_mixing
    all_linear = dataclasses.replace(TINY, layer_pattern="L")
    assert flops_per_token(all_linear, 8) == flops_per_token(all_linear, 8000)
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(TINY, 0)


def test_gated_mixers_by_hand():
    """GatedDeltaNet (D) and GLA (G) layers: projections, short convolution and the recurrence, counted by hand."""
    cfg = dataclasses.replace(TINY, layer_pattern="DG")  # K = 4 conv taps
    qkv, out, mlp = 4 * (2 + 2 * 1) * 2, 2 * 2 * 4, 3 * 4 * 6  # 32, 16, 72
    d_proj = qkv + out + mlp + 4 * 2 * 2 + 4 * 2 * 2  # + beta/decay 2Hh = 16, output gate Hhd = 16: 152
    g_proj = qkv + out + mlp + 4 * 2 * 2 + 4 * 2 * 2  # + gate (gk) Hhd = 16, output gate 16: 152
    conv = 2 * 4 * (2 + 2 * 1) * 2  # 2 K (h + 2g) d = 64
    d_state = 6 * 2 * 2 * 2  # 6 h d^2: S^T k, k u^T, q.S = 48
    g_state = 4 * 2 * 2 * 2  # 4 h d^2: k^T v, q.S = 32
    forward = 2 * 40 + 2 * d_proj + conv + d_state + 2 * g_proj + conv + g_state  # 896
    assert flops_per_token(cfg, 8) == 3 * forward == 2688.0
    assert flops_per_token(cfg, 8) == flops_per_token(cfg, 8000)  # no sequence term
    # Parameters: D = 152 + norms 8 + conv taps (h+2g) d K = 32 + head norm 4 + A_log, dt_bias 4 = 200;
    # G = 152 + 8 + 32 + 4 = 196; embedding + output layer + final norm 84.
    assert num_parameters(cfg) == 84 + 200 + 196 == 480


def test_packed_documents_sum_attention_per_document():
    seq = 64
    full = flops_per_token(TINY, seq)
    packed = flops_per_token(TINY, seq, doc_len=16)
    assert full - packed == 3 * 2 * 2 * 2 * (seq - 16)  # 2 h d (T - l) per token, x3
    assert flops_per_token(TINY, seq, doc_len=1000) == full
    with pytest.raises(ValueError, match="doc_len"):
        flops_per_token(TINY, seq, doc_len=0)


def _full_count(tp: int, tie: bool, pattern: str = "LA"):
    mesh = init_mesh(MeshConfig(tp=tp))
    cfg = dataclasses.replace(TINY, num_heads=4, num_kv_heads=2, hidden_size=8, tie_embeddings=tie,
                              layer_pattern=pattern)
    model = build_model(cfg, mesh)
    full = gather_full_parameters(model, mesh.tp_group)
    return sum(t.numel() for t in full.values()), model.num_parameters(), model.flops_per_token(16)


@pytest.mark.parametrize("tie,pattern", [(False, "LA"), (True, "DGA")])
def test_num_parameters_matches_the_gathered_model(tie, pattern):
    for counted, formula, flops in run_distributed(_full_count, 2, 2, tie, pattern):
        assert counted == formula
        assert flops > 0
