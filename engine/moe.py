"""Step MoE block: fp32 sigmoid router with a selection-only bias, renormalised top-k, routed scaling,
clamped-SwiGLU experts and an always-on shared expert.

The routed experts run through the Triton fused-MoE kernel on CUDA (engine.kernels.fused_moe) and through
`experts_torch` elsewhere; both take the same (weights, ids) produced by `route`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers import MLP, Spec, swiglu


def route(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (weights fp32 [T, k] already multiplied by the routed scaling factor, expert ids [T, k])."""
    scores = torch.sigmoid(F.linear(x.float(), weight))
    _, ids = torch.topk(scores + bias, top_k, dim=-1, sorted=False)
    w = scores.gather(1, ids)
    return w * (scale / w.sum(dim=-1, keepdim=True)), ids


def experts_torch(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    limit: float,
) -> torch.Tensor:
    """Routed experts in PyTorch: sort the (token, slot) pairs by expert and run only the experts hit.

    When most experts get tokens, torch's grouped GEMM (CPU included) does the layer in two calls over
    contiguous per-expert segments; when few do (decode), a loop over just those experts is cheaper,
    since the grouped GEMM visits every expert, empty or not.
    """
    T, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w_gate_up.shape[0])
    tok = order // k
    xs = x[tok]
    if _HAS_GROUPED_MM and x.dtype == torch.float32 and T * k >= w_gate_up.shape[0]:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = swiglu(torch._grouped_mm(xs, w_gate_up.transpose(1, 2), offs=offs), limit)
        out = torch._grouped_mm(h, w_down.transpose(1, 2), offs=offs)
    else:
        out = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c == 0:
                continue
            seg = slice(start, start + c)
            out[seg] = F.linear(swiglu(F.linear(xs[seg], w_gate_up[e]), limit), w_down[e])
            start += c
    out = out * weights.reshape(-1)[order, None].to(out.dtype)
    return torch.zeros_like(x).index_add_(0, tok, out)


# torch._grouped_mm runs on the CPU in recent torch; older builds (or other dtypes) use the loop.
_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _fused_moe():
    try:
        from engine.kernels.fused_moe import fused_moe
    except ImportError:  # kernels not shipped (or triton absent): the PyTorch path still works
        return None
    return fused_moe


class MoE(nn.Module):
    def __init__(
        self,
        hidden: int,
        inter: int,
        n_experts: int,
        top_k: int,
        shared_inter: int,
        scale: float,
        limit: float,
        limit_shared: float,
    ):
        super().__init__()
        self.hidden, self.inter, self.n_experts = hidden, inter, n_experts
        self.top_k, self.scale, self.limit = top_k, scale, limit
        self.router = nn.Parameter(torch.empty(n_experts, hidden), requires_grad=False)  # kept fp32
        self.router_bias = nn.Parameter(torch.empty(n_experts), requires_grad=False)  # kept fp32
        self.gate_up = nn.Parameter(torch.empty(n_experts, 2 * inter, hidden), requires_grad=False)
        self.down = nn.Parameter(torch.empty(n_experts, hidden, inter), requires_grad=False)
        self.shared = MLP(hidden, shared_inter, limit_shared)

    def checkpoint_spec(self, prefix: str) -> Spec:
        e, h, i = self.n_experts, self.hidden, self.inter
        m = f"{prefix}.moe"
        spec: Spec = {
            "router": ([(f"{m}.gate.weight", (e, h))], 0),
            "router_bias": ([(f"{m}.router_bias", (e,))], 0),
            "gate_up": ([(f"{m}.gate_proj.weight", (e, i, h)), (f"{m}.up_proj.weight", (e, i, h))], 1),
            "down": ([(f"{m}.down_proj.weight", (e, h, i))], 0),
        }
        for name, src in self.shared.checkpoint_spec(f"{prefix}.share_expert").items():
            spec[f"shared.{name}"] = src
        return spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = route(x, self.router, self.router_bias, self.top_k, self.scale)
        fused = _fused_moe() if x.is_cuda else None
        if fused is not None:
            i = self.inter
            routed = fused(
                x, self.gate_up[:, :i], self.gate_up[:, i:], self.down, weights, ids, swiglu_limit=self.limit
            )
        else:
            routed = experts_torch(x, self.gate_up, self.down, weights, ids, self.limit)
        return (routed + self.shared(x)).reshape(shape)
