"""The copy probe's sequences: the target is the number from the tool response, and nothing else is trained;
its preset variants change only what they name."""

from __future__ import annotations

import random

import pytest
from advisor.engine.text.tokenizer import load_tokenizer

from training.checkpoint import PRESETS
from training.copy_probe import preset, sample


def test_the_target_is_the_number_in_the_tool_response(tok_dir):
    tok = load_tokenizer(tok_dir)
    pool = list(range(100, 200))
    rng = random.Random(0)
    for _ in range(10):
        ids, labels = sample(rng, tok, 30, pool)
        cut = next(i for i, y in enumerate(labels) if y != -100)
        assert all(30 <= i or t in pool for i, t in enumerate(ids))
        number = tok.decode(ids[cut:]).removesuffix("<|im_end|>")
        assert number.isdigit() and 3 <= len(number) <= 7
        assert tok.decode(ids[30:cut]).startswith(f"<|im_start|>tool_response\n<tool_response>{number}\n")
        assert tok.decode(ids[30:cut]).endswith("Answer: ") and labels[cut:] == ids[cut:]


def test_variants_change_the_layer_types_and_window_only():
    base = PRESETS["step-nano"]
    v = preset("step-nano", "sliding,sliding,sliding,full", 32)
    assert v["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"] and v["sliding_window"] == 32
    assert v["partial_rotary_factors"] == [1.0, 1.0, 1.0, 0.5]
    assert {
        k: x
        for k, x in v.items()
        if k not in ("layer_types", "sliding_window", "rope_theta", "partial_rotary_factors")
    } == {
        k: x
        for k, x in base.items()
        if k not in ("layer_types", "sliding_window", "rope_theta", "partial_rotary_factors")
    }
    assert preset("step-nano", None, None) == base
    with pytest.raises(SystemExit, match="3 types for 4 layers"):
        preset("step-nano", "full,sliding,full", None)
