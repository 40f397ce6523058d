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


def _full_count(tp: int, tie: bool):
    mesh = init_mesh(MeshConfig(tp=tp))
    cfg = dataclasses.replace(TINY, num_heads=4, num_kv_heads=2, hidden_size=8, tie_embeddings=tie)
    model = build_model(cfg, mesh)
    full = gather_full_parameters(model, mesh.tp_group)
    return sum(t.numel() for t in full.values()), model.num_parameters(), model.flops_per_token(16)


@pytest.mark.parametrize("tie", [False, True])
def test_num_parameters_matches_the_gathered_model(tie):
    for counted, formula, flops in run_distributed(_full_count, 2, 2, tie):
        assert counted == formula
        assert flops > 0
