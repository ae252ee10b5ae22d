"""advisor.engine.kernels.reference.fused_moe_torch (the kernel's PyTorch twin and CPU path) against transformers'
Step3p7Experts and the engine's own expert path, on the same weights. No Triton here: plain CPU tests."""

from __future__ import annotations

import pytest
import torch
from advisor.engine.kernels.reference import fused_moe_torch
from advisor.engine.model.moe import experts_torch

from tests.engine.step_models import reference_experts

E = 8


def _weights(H: int, inter: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    w_gate_up = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).to(dtype)  # checkpoint layout
    w_down = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(dtype)
    return w_gate_up, w_down


def _routing(T: int, k: int, seed: int, duplicates: bool):
    """Experts 6 and 7 never get a pair; with `duplicates` every token sends slots 0 and 1 to one expert."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E - 2, generator=g)[:k] for _ in range(T)])
    if duplicates:
        ids[:, 1] = ids[:, 0]
    return torch.rand(T, k, generator=g) * 3.0, ids


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6)).item()


@pytest.mark.parametrize("T,k,H,inter", [(1, 2, 32, 32), (5, 3, 64, 48), (33, 2, 32, 48)])
@pytest.mark.parametrize("limit", [0.0, 0.6], ids=["noclamp", "clamp"])
@pytest.mark.parametrize("duplicates", [False, True], ids=["distinct", "dup"])
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_matches_transformers_and_the_engine_path_in_fp32(T, k, H, inter, limit, duplicates, implementation):
    w_gate_up, w_down = _weights(H, inter, torch.float32, seed=T + k)
    weights, ids = _routing(T, k, seed=T * k, duplicates=duplicates)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(11))
    w_gate, w_up = w_gate_up[:, :inter], w_gate_up[:, inter:]
    got = fused_moe_torch(x, w_gate, w_up, w_down, weights, ids.int(), swiglu_limit=limit)
    assert got.dtype == torch.float32 and got.shape == (T, H)
    want = reference_experts(x, w_gate_up, w_down, weights, ids, limit, implementation)
    assert _rel_err(got, want) < 1e-5
    engine = experts_torch(x, w_gate_up.transpose(1, 2), w_down.transpose(1, 2), weights, ids, limit)
    assert _rel_err(got, engine) < 1e-5
    if limit:  # the clamp must change the result here, or the clamped cases would prove nothing
        assert _rel_err(got, fused_moe_torch(x, w_gate, w_up, w_down, weights, ids)) > 1e-2


def test_duplicate_slots_count_twice():
    """A token routed to one expert in two slots gets that expert's output weighted by the sum."""
    w_gate_up, w_down = _weights(32, 32, torch.float32, seed=1)
    w_gate, w_up = w_gate_up[:, :32], w_gate_up[:, 32:]
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[3, 3]] * 4)
    split = fused_moe_torch(x, w_gate, w_up, w_down, torch.tensor([[0.25, 0.5]] * 4), ids)
    once = fused_moe_torch(x, w_gate, w_up, w_down, torch.tensor([[0.75]] * 4), ids[:, :1])
    torch.testing.assert_close(split, once, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_stays_near_the_fp32_result(dtype):
    w_gate_up, w_down = _weights(64, 48, torch.float32, seed=4)
    weights, ids = _routing(9, 3, seed=5, duplicates=False)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(6))
    args = [t.to(dtype) for t in (x, w_gate_up[:, :48], w_gate_up[:, 48:], w_down)]
    got = fused_moe_torch(*args, weights, ids, swiglu_limit=0.6)
    assert got.dtype == dtype
    # The fp32 reference on the same rounded inputs: only the intermediate roundings differ.
    want = fused_moe_torch(*[a.float() for a in args], weights, ids, swiglu_limit=0.6)
    assert _rel_err(got, want) < (4e-3 if dtype == torch.float16 else 2e-2)


def test_no_tokens_and_bad_input_are_one_line_errors():
    w_gate_up, w_down = _weights(32, 32, torch.float32, seed=0)
    w_gate, w_up = w_gate_up[:, :32], w_gate_up[:, 32:]
    x = torch.randn(3, 32)
    weights, ids = _routing(3, 2, seed=0, duplicates=False)
    assert fused_moe_torch(x[:0], w_gate, w_up, w_down, weights[:0], ids[:0]).shape == (0, 32)
    cases = [
        ((x, w_gate, w_up, w_down[..., :16], weights, ids), r"w_down has shape \(8, 32, 16\), expected"),
        ((x, w_gate, w_up.half(), w_down, weights, ids), "w_up is torch.float16"),
        ((x, w_gate, w_up, w_down, weights[:, :1], ids), r"must both be \[T=3, k\]"),
        ((x, w_gate, w_up, w_down, weights, ids.float()), "must be an integer tensor"),
        ((x, w_gate, w_up, w_down, weights, ids + 7), r"must lie in \[0, 8\), got values in \[7, 12\]"),
        ((x[0], w_gate, w_up, w_down, weights, ids), r"x must be \[T, H\]"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            fused_moe_torch(*args)
        assert "\n" not in str(err.value)
