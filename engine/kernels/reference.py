"""The fused MoE in plain PyTorch, on the kernel's weight layout and with the kernel's signature.

It is the semantic reference for `fused_moe.fused_moe` and a CPU fallback with the same call:

    out[t] = sum_j  w[t, j] * down_e( act(gate_e x_t, up_e x_t) ),  e = ids[t, j]
    act(g, u) = min(silu(g), L) * clamp(u, -L, L)   when L > 0, else silu(g) * u

(transformers' Step3p7Experts: the clamp comes after the activation on the gate, and only from above; the
up projection is clamped on both sides.) The rounding points are the kernel's: the activation is computed
in fp32 and rounded to x's dtype, each (token, slot) row of the down projection is scaled by its fp32
routing weight and rounded to x's dtype, and the k rows of a token are summed in fp32.

The (token, slot) pairs are sorted by expert once and the loop runs only over the experts that got pairs,
so idle experts cost nothing and one matmul serves all of an expert's tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_clamped(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(gate) * up, with Step's clamp when limit > 0; computed in fp32, returned in fp32."""
    g = F.silu(gate.float())
    u = up.float()
    if limit > 0:
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
    return g * u


def check_moe_args(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    where: str = "fused_moe_torch",
) -> None:
    """One-line ValueErrors naming the argument and both shapes (or dtypes/devices)."""
    if x.dim() != 2:
        raise ValueError(f"{where}: x must be [T, H], got shape {tuple(x.shape)}")
    T, H = x.shape
    if w_gate.dim() != 3:
        raise ValueError(f"{where}: w_gate must be [E, I, H], got shape {tuple(w_gate.shape)}")
    E, inter = w_gate.shape[0], w_gate.shape[1]
    for name, t, want in (
        ("w_gate", w_gate, (E, inter, H)),
        ("w_up", w_up, (E, inter, H)),
        ("w_down", w_down, (E, H, inter)),
    ):
        if tuple(t.shape) != want:
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, expected {want}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{where}: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
    if topk_ids.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != T:
        raise ValueError(
            f"{where}: topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
            f"must both be [T={T}, k]"
        )
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"{where}: topk_ids must be an integer tensor, got {topk_ids.dtype}")


def fused_moe_torch(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    swiglu_limit: float = 0.0,
) -> torch.Tensor:
    """x [T, H]; w_gate, w_up [E, I, H]; w_down [E, H, I]; topk_weights [T, k] (fp32, already scaled);
    topk_ids [T, k] (int32/int64) -> [T, H] in x's dtype. swiglu_limit <= 0 means no clamp."""
    check_moe_args(x, w_gate, w_up, w_down, topk_weights, topk_ids)
    T, k = topk_ids.shape
    E = w_gate.shape[0]
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    if T == 0 or k == 0:
        return out.to(x.dtype)
    flat = topk_ids.reshape(-1).long()
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= E:
        raise ValueError(f"fused_moe_torch: topk_ids must lie in [0, {E}), got values in [{lo}, {hi}]")
    # Stable sort: within an expert the pairs stay in token order (same order as the kernel's alignment).
    order = torch.argsort(flat, stable=True)
    tok = order // k
    xs = x[tok]
    w_sorted = topk_weights.reshape(-1)[order].float()
    counts = torch.bincount(flat, minlength=E).tolist()
    y = torch.empty(flat.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        seg = slice(start, start + c)
        h = swiglu_clamped(xs[seg] @ w_gate[e].T, xs[seg] @ w_up[e].T, swiglu_limit).to(x.dtype)
        y[seg] = ((h @ w_down[e].T).float() * w_sorted[seg, None]).to(x.dtype)
        start += c
    return out.index_add_(0, tok, y.float()).to(x.dtype)
