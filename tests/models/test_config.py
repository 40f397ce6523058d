"""ModelConfig validation: clear ValueErrors for shapes, patterns, options and parallel layouts."""
import pytest

from lctrain.models import ModelConfig


@pytest.mark.parametrize("kw,match", [
    (dict(hidden_size=30, num_heads=4), "hidden_size 30 is not divisible by num_heads 4"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads 3 does not divide num_heads 4"),
    (dict(layer_pattern="LAX"), "unknown characters \\['X'\\]"),
    (dict(layer_pattern="la"), "unknown characters"),
    (dict(layer_pattern=""), "layer_pattern is empty"),
    (dict(feature_map="tanh"), "feature_map must be one of"),
    (dict(linear_decay="learned"), "linear_decay must be one of"),
    (dict(linear_output_gate="relu"), "linear_output_gate must be one of"),
    (dict(softmax_sp="striped"), "softmax_sp must be one of"),
    (dict(linear_sp="lasp3"), "linear_sp must be one of"),
    (dict(num_layers=0), "num_layers must be an integer >= 1"),
    (dict(vocab_size=1.5), "vocab_size must be an integer"),
    (dict(norm_eps=0.0), "norm_eps must be > 0"),
    (dict(init_std=-1.0), "init_std must be > 0"),
    (dict(layer_pattern="LW", window_size=0), "window_size must be an integer >= 1"),
    (dict(layer_pattern="LW", window_sp="ulysses"), "window_sp must be one of"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw)


def test_pattern_repeats_to_depth():
    assert ModelConfig(num_layers=6, layer_pattern="LLA").mixers == "LLALLA"
    assert ModelConfig(num_layers=5, layer_pattern="LLLA").mixers == "LLLAL"
    assert ModelConfig(num_layers=3, layer_pattern="A").mixers == "AAA"


@pytest.mark.parametrize("kw,tp,cp,layout,match", [
    (dict(num_heads=4, num_kv_heads=4), 8, 1, "zigzag", "num_heads 4 is not divisible by the TP size 8"),
    (dict(num_heads=4, num_kv_heads=2), 4, 1, "zigzag", "num_kv_heads 2 is not divisible by the TP size 4"),
    (dict(vocab_size=255), 2, 1, "zigzag", "vocab_size 255 is not divisible by the TP size 2"),
    (dict(ffn_hidden_size=171), 2, 1, "zigzag", "ffn_hidden_size 171 is not divisible"),
    (dict(layer_pattern="A", softmax_sp="ulysses", num_heads=4, num_kv_heads=4), 2, 4, "zigzag",
     "heads per TP rank \\(4/2 = 2\\) divisible by the CP size 4"),
    (dict(layer_pattern="A", softmax_sp="ulysses", num_heads=12, num_kv_heads=6, hidden_size=48), 1, 4,
     "zigzag", "kv heads per TP rank \\(6\\) and the CP size 4"),
    (dict(layer_pattern="LA", linear_sp="lasp1"), 1, 2, "zigzag", "lasp1.*contiguous"),
    (dict(), 1, 2, "striped", "cp_layout must be"),
])
def test_bad_parallel_layout_raises(kw, tp, cp, layout, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw).validate_parallel(tp, cp, layout)


def test_good_parallel_layouts_pass():
    ModelConfig(layer_pattern="A", softmax_sp="ulysses", num_heads=4, num_kv_heads=1).validate_parallel(1, 4, "zigzag")
    ModelConfig(layer_pattern="A", linear_sp="lasp1").validate_parallel(1, 2, "zigzag")  # no linear layer
    ModelConfig(layer_pattern="L", softmax_sp="ulysses", num_heads=4).validate_parallel(1, 8, "zigzag")  # no softmax
