"""The published comparisons: hand-computed model FLOPs behind them, and docs/planner.md equal to the code."""
from __future__ import annotations

from pathlib import Path

import pytest

from lctrain.models.flops import flops_per_token, mixing_flops
from lctrain.plan.published import BEGIN, END, LLAMA2_7B, markdown, page_section

PAGE = Path(__file__).resolve().parents[2] / "docs" / "planner.md"


def test_llama2_7b_flops_by_hand():
    """NeMo's model: per layer QKV 4096 x 96 x 128, output 128 x 32 x 4096, SwiGLU 3 x 4096 x 11008 = 202,375,168
    weights; 32 layers + the output layer 4096 x 32000 = 6,607,077,376; causal attention 2 h d T per layer."""
    t = 16384
    dense = 32 * (4096 * 96 * 128 + 32 * 128 * 4096 + 3 * 4096 * 11008) + 4096 * 32000
    assert dense == 6_607_077_376
    attention = 32 * 2 * 32 * 128 * t
    assert flops_per_token(LLAMA2_7B, t) == 3 * (2 * dense + attention) == 52_527_366_144
    # NeMo (Megatron's formula) counts causal attention as full: the attention term twice.
    full = flops_per_token(LLAMA2_7B, t) + 3 * 32 * mixing_flops(LLAMA2_7B, "A", t)
    assert full / flops_per_token(LLAMA2_7B, t) == pytest.approx(65_412_268_032 / 52_527_366_144)


def test_page_has_the_generated_section():
    page = PAGE.read_text()
    assert page.index(BEGIN) < page.index(END)
    with pytest.raises(ValueError, match="markers"):
        page_section("no markers here")


@pytest.mark.slow
def test_planner_page_matches_the_code():
    """Fails when docs/planner.md and the code disagree: regenerate with
    `python -m lctrain.plan.published --write docs/planner.md`."""
    assert page_section(PAGE.read_text()) == markdown(), \
        "docs/planner.md is stale: python -m lctrain.plan.published --write docs/planner.md"
