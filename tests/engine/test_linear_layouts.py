"""The CPU projection layouts: oneDNN-packed wide projections, [in, out] for the rest, same results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.layers import Linear, _onednn_linear


def _linear(out_f: int, in_f: int, seed: int = 0) -> tuple[Linear, torch.Tensor]:
    m = Linear(out_f, in_f)
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    m.weight.data.copy_(w)
    return m, w


@pytest.mark.skipif(not _onednn_linear(), reason="this torch build has no oneDNN linear")
def test_a_wide_projection_is_packed_once_and_matches_the_plain_matmul():
    m, w = _linear(520, 64)
    m.relayout()
    assert m.packed is not None and m.weight is None  # one copy of the weights, not two
    for shape in ((1, 64), (5, 64), (40, 64), (2, 3, 64)):
        x = torch.randn(*shape)
        with torch.inference_mode():
            torch.testing.assert_close(m(x), F.linear(x, w), rtol=1e-5, atol=1e-4)
    m.relayout()  # idempotent
    assert m.packed is not None


def test_narrower_projections_are_stored_in_out_and_can_opt_out(monkeypatch):
    m, w = _linear(96, 64)
    m.relayout()
    assert m.packed is None and m.transposed and m.weight.shape == (64, 96)
    x = torch.randn(3, 64)
    torch.testing.assert_close(m(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("ADVISOR_CPU_ONEDNN", "0")
    wide, w2 = _linear(520, 64)
    wide.relayout()
    assert wide.packed is None and wide.transposed
    torch.testing.assert_close(wide(x), F.linear(x, w2), rtol=1e-5, atol=1e-4)


def test_bf16_projections_are_not_packed():
    m = Linear(520, 64).to(torch.bfloat16)
    m.relayout()
    assert m.packed is None and m.transposed
