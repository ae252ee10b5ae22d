"""The CPU projection layouts: oneDNN-packed large projections, [in, out] for the rest, same results."""

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
@pytest.mark.parametrize("out_f", [512, 2100])
def test_a_large_projection_is_packed_once_and_matches_the_plain_matmul(out_f):
    m, w = _linear(out_f, 512)
    m.relayout()
    assert m.packed is not None and m.weight is None  # one copy of the weights, not two
    for shape in ((1, 512), (5, 512), (40, 512), (2, 3, 512)):
        x = torch.randn(*shape)
        with torch.inference_mode():
            torch.testing.assert_close(m(x), F.linear(x, w), rtol=1e-5, atol=1e-4)
    m.relayout()  # idempotent
    assert m.packed is not None


def test_smaller_projections_are_stored_in_out_and_can_opt_out(monkeypatch):
    m, w = _linear(2100, 128)  # wide, but from few inputs (a shared expert's down is 512 x 128)
    m.relayout()
    assert m.packed is None and m.transposed and m.weight.shape == (128, 2100)
    x = torch.randn(3, 128)
    torch.testing.assert_close(m(x), F.linear(x, w), rtol=1e-5, atol=1e-4)
    narrow, w1 = _linear(100, 512)  # out < in and small: the checkpoint layout
    narrow.relayout()
    assert narrow.packed is None and not narrow.transposed
    x1 = torch.randn(3, 512)
    torch.testing.assert_close(narrow(x1), F.linear(x1, w1), rtol=1e-5, atol=1e-4)
    monkeypatch.setenv("ADVISOR_CPU_ONEDNN", "0")
    large, w2 = _linear(2100, 512)
    large.relayout()
    assert large.packed is None and large.transposed
    torch.testing.assert_close(large(x1), F.linear(x1, w2), rtol=1e-5, atol=1e-4)


def test_bf16_projections_are_not_packed():
    m = Linear(2100, 512).to(torch.bfloat16)
    m.relayout()
    assert m.packed is None and m.transposed
