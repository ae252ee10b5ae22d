"""The CPU projection layouts: column panels for the compiled op; without it oneDNN-packed large
projections and [in, out] for the rest; the same results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from advisor.engine.model import cpu_decode
from advisor.engine.model.layers import (
    PANEL_ROWS,
    ColumnPanels,
    KMajor,
    Linear,
    OneDNNPacked,
    RowMajor,
    _onednn_linear,
    from_panels,
    to_panels,
)

from tests.engine.kernel_sets import KERNEL_SETS, kernel_set


def _linear(out_f: int, in_f: int, seed: int = 0) -> tuple[Linear, torch.Tensor]:
    m = Linear(out_f, in_f)
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    m.weight.data.copy_(w)
    return m, w


@pytest.fixture
def no_ops(monkeypatch):
    monkeypatch.setitem(cpu_decode._state, "ops", None)


@pytest.mark.skipif(cpu_decode.ops() is None, reason="no C++ toolchain: the other layouts run instead")
@pytest.mark.parametrize(("out_f", "in_f"), [(512, 512), (2100, 128), (37, 24), (16, 16)])
def test_fp32_projections_take_column_panels_for_any_number_of_rows(out_f, in_f, monkeypatch):
    m, w = _linear(out_f, in_f)
    m.relayout()
    assert isinstance(m.layout, ColumnPanels)
    assert m.weight is None and m.layout.panels.shape == (
        -(-out_f // 16),
        in_f,
        16,
    )  # one copy of the weights
    assert torch.equal(from_panels(to_panels(w), out_f), w)
    calls = []
    real = cpu_decode.ops()

    class Counting:
        def panel_linear(self, x, p, n):
            calls.append(x.shape[0])
            return real.panel_linear(x, p, n)

    monkeypatch.setitem(cpu_decode._state, "ops", Counting())
    # up to PANEL_ROWS rows through the op (groups of 16, a padded rest of 1, 2, 4, 8 or 16), beyond: unpacked
    for shape in (
        (1, in_f),
        (3, in_f),
        (2, 5, in_f),
        (16, in_f),
        (37, in_f),
        (PANEL_ROWS, in_f),
        (2, PANEL_ROWS // 2 + 1, in_f),
    ):
        x = torch.randn(*shape)
        with torch.inference_mode():
            torch.testing.assert_close(m(x), F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert calls == [1, 3, 10, 16, 37, PANEL_ROWS]
    panels = m.layout
    m.relayout()  # idempotent
    assert m.layout is panels
    with pytest.raises(RuntimeError, match="do not match"):
        real.panel_linear(torch.randn(2, in_f + 1), m.layout.panels, out_f)


@pytest.mark.skipif(not _onednn_linear(), reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("out_f", [512, 2100])
def test_a_large_projection_is_packed_once_and_matches_the_plain_matmul(out_f, no_ops):
    m, w = _linear(out_f, 512)
    m.relayout()
    assert isinstance(m.layout, OneDNNPacked) and m.weight is None  # one copy of the weights, not two
    for shape in ((1, 512), (5, 512), (40, 512), (2, 3, 512)):
        x = torch.randn(*shape)
        with torch.inference_mode():
            torch.testing.assert_close(m(x), F.linear(x, w), rtol=1e-5, atol=1e-4)
    packed = m.layout
    m.relayout()  # idempotent
    assert m.layout is packed


def test_smaller_projections_are_stored_in_out_and_can_opt_out(monkeypatch, no_ops):
    m, w = _linear(2100, 128)  # wide, but from few inputs (a shared expert's down is 512 x 128)
    m.relayout()
    assert isinstance(m.layout, KMajor) and m.weight.shape == (128, 2100)
    x = torch.randn(3, 128)
    torch.testing.assert_close(m(x), F.linear(x, w), rtol=1e-5, atol=1e-4)
    narrow, w1 = _linear(100, 512)  # out < in and small: the checkpoint layout
    narrow.relayout()
    assert isinstance(narrow.layout, RowMajor) and narrow.weight.shape == (100, 512)
    x1 = torch.randn(3, 512)
    torch.testing.assert_close(narrow(x1), F.linear(x1, w1), rtol=1e-5, atol=1e-4)
    monkeypatch.setenv("ADVISOR_CPU_ONEDNN", "0")
    large, w2 = _linear(2100, 512)
    large.relayout()
    assert isinstance(large.layout, KMajor)
    torch.testing.assert_close(large(x1), F.linear(x1, w2), rtol=1e-5, atol=1e-4)


def test_bf16_projections_are_not_packed():
    m = Linear(2100, 512).to(torch.bfloat16)
    m.relayout()
    assert isinstance(m.layout, KMajor)


@pytest.fixture(params=KERNEL_SETS)
def fp32_kernels(request):
    """Which fp32 panel kernel runs."""
    ops = cpu_decode.ops()
    with kernel_set(ops, request.param):
        yield ops


@pytest.mark.skipif(cpu_decode.ops() is None, reason="no C++ toolchain: the other layouts run instead")
@pytest.mark.parametrize(
    ("out_f", "in_f", "rows"),
    [
        (37, 24, range(1, 131)),  # every row count: each register tile and remainder, past PANEL_ROWS
        (100, 77, range(1, 131)),  # K not a multiple of the unrolling
        (5, 3, range(1, 20)),  # one partial panel, K below any unrolling
        (1036, 512, [1, 2, 3, 4, 5, 6, 7, 8, 13, 16, 17, 64, 130]),  # the bench model's sliding qkvg
        (519, 1408, [1, 2, 6, 9]),
    ],
)
def test_panel_linear_kernels_match_the_matmul(fp32_kernels, out_f, in_f, rows):
    g = torch.Generator().manual_seed(out_f)
    w = torch.randn(out_f, in_f, generator=g)
    panels = to_panels(w)
    for m in rows:
        x = torch.randn(m, in_f, generator=g)
        want = (x.double() @ w.double().T).float()
        got = fp32_kernels.panel_linear(x, panels, out_f)
        assert got.shape == (m, out_f)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5 * in_f**0.5, msg=f"{m} rows")
