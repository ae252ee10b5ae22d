"""Step MoE block: fp32 sigmoid router with a selection-only bias, renormalised top-k, routed scaling,
clamped-SwiGLU experts and an always-on shared expert.

The routed experts run through the Triton fused-MoE kernel on CUDA (advisor.engine.kernels.fused_moe), through the
compiled CPU op (`cpu_decode.decode_moe`) where `cpu_decode.experts_fit` holds, and through `experts_torch`
elsewhere; all take the same (weights, ids) produced by `route`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from advisor.engine.model import cpu_decode
from advisor.engine.model.layers import MLP, KMajor, Spec, swiglu
from advisor.engine.quant.packed import QWeight, scratch
from torch import nn


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
    w_gate_up_t: torch.Tensor,
    w_down_t: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    limit: float,
    schedule: str | None = None,
) -> torch.Tensor:
    """Routed experts in PyTorch, on K-major weights: w_gate_up_t [E, H, 2I], w_down_t [E, I, H], or the
    same blocked for the CPU ops (`block16`: [E, H/16, 2I/16, 16, 16], [E, I/16, H/16, 16, 16]; always the
    loop schedule then, each expert's weights unblocked as it comes).

    The (token, slot) pairs are sorted by expert, then one of three schedules runs them:
    - "loop": a Python loop over the experts that got tokens (few pairs: decode at small batch);
    - "padded": every expert's tokens padded to the busiest expert's count, two batched matmuls over all
      experts (many experts hit with few tokens each: batched decode; a per-expert loop there is mostly
      call overhead);
    - "grouped": torch's grouped GEMM over the ragged segments (long prefills with uneven loads).
    """
    T, k = ids.shape
    E = w_gate_up_t.shape[0]
    blocked = w_gate_up_t.dim() == 5
    if blocked:
        schedule = "loop"
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    tok = order // k
    n = T * k
    if schedule is None:
        # Measured on CPU (E=64, top-8): the loop wins while few experts are hit; padding wins from about
        # one pair per expert on, as long as the busiest expert does not inflate the padding too much.
        # Long prefills (dozens of tokens per expert) are efficient GEMMs either way: loop.
        if n * 4 <= E or n >= 32 * E:
            schedule = "loop"
        elif n >= E and int(counts.max()) * E <= 4 * n:
            schedule = "padded"
        else:
            schedule = "grouped"
        if schedule == "grouped" and not _HAS_GROUPED_MM:
            schedule = "padded"
    if schedule == "loop":
        # Expert by expert, gathering its tokens and adding its outputs straight into the result: no
        # [T * k, H] intermediates. At long prefills those pass 32 MB, where glibc maps every allocation
        # afresh, and the page faults cost more than the GEMMs (16 x 128 tokens: 0.61 -> 0.50 s here).
        w_sorted = weights.reshape(-1)[order, None].to(x.dtype)
        result = torch.zeros_like(x)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c == 0:
                continue
            seg = slice(start, start + c)
            rows = tok[seg]
            gu, dn = (
                (unblock16(w_gate_up_t[e]), unblock16(w_down_t[e]))
                if blocked
                else (w_gate_up_t[e], w_down_t[e])
            )
            y = swiglu(x.index_select(0, rows) @ gu, limit) @ dn
            result.index_add_(0, rows, y * w_sorted[seg])
            start += c
        return result
    xs = x[tok]
    if schedule == "padded":
        cap = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        sorted_e = flat[order]
        slot = sorted_e * cap + (torch.arange(n, device=x.device) - starts[sorted_e])
        xp = x.new_zeros(E * cap, x.shape[1])
        xp[slot] = xs
        h = swiglu(torch.bmm(xp.view(E, cap, -1), w_gate_up_t), limit)
        out = torch.bmm(h, w_down_t).view(E * cap, -1)[slot]
    else:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = swiglu(torch._grouped_mm(xs, w_gate_up_t, offs=offs), limit)
        out = torch._grouped_mm(h, w_down_t, offs=offs)
    out = out * weights.reshape(-1)[order, None].to(out.dtype)
    return torch.zeros_like(x).index_add_(0, tok, out)


def experts_quantized(
    x: torch.Tensor, gate_up: QWeight, down: QWeight, weights: torch.Tensor, ids: torch.Tensor, limit: float
) -> torch.Tensor:
    """Routed experts on quantized weights (`advisor.engine.quant.packed.QWeight`), expert by expert: each hit
    expert's gate_up, then its down, dequantized K-major into one reused per-thread buffer on the CPU (no
    fp32 copy of the experts is ever held), its tokens gathered and its outputs added into the result."""
    T, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate_up.experts)
    tok = order // k
    w_sorted = weights.reshape(-1)[order, None].to(x.dtype)
    result = torch.zeros_like(x)
    H, I2 = gate_up.in_features, gate_up.out_features
    I = down.in_features  # noqa: E741
    cpu = x.is_cpu
    buf = scratch(H * I2) if cpu else None  # gate_up's [H, 2I], then down's [I, H] in the same buffer
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        seg = slice(start, start + c)
        rows = tok[seg]
        gu = gate_up.dequantize_k_major(e, out=buf[: H * I2].view(H, I2) if cpu else None)
        h = swiglu(x.index_select(0, rows) @ gu.to(x.dtype), limit)
        dn = down.dequantize_k_major(e, out=buf[: I * H].view(I, H) if cpu else None)
        result.index_add_(0, rows, (h @ dn.to(x.dtype)) * w_sorted[seg])
        start += c
    return result


def block16(w: torch.Tensor) -> torch.Tensor:
    """Checkpoint-layout experts [E, N, K] (out, in) -> blocked K-major [E, K/16, N/16, 16, 16]: tile (kb, nb)
    holds rows kb*16.. and columns nb*16.. of the K-major [K, N], each tile contiguous (one copy)."""
    E, N, K = w.shape
    return w.reshape(E, N // 16, 16, K // 16, 16).permute(0, 3, 1, 4, 2).contiguous()


def unblock16(w: torch.Tensor) -> torch.Tensor:
    """One expert's blocked [K/16, N/16, 16, 16] -> K-major [K, N] (a copy)."""
    kb, nb, _, _ = w.shape
    return w.transpose(1, 2).reshape(kb * 16, nb * 16)


# torch._grouped_mm runs on the CPU in recent torch; without it long prefills use the padded schedule.
_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def fused_moe_kernel():
    """advisor.engine.kernels.fused_moe.fused_moe, or None where the kernels (or triton) are unavailable."""
    try:
        from advisor.engine.kernels.fused_moe import fused_moe
    except ImportError:
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
        # Loaded in checkpoint layout; `prepare` then picks the layout the expert path on this device reads:
        # "blocked" (`block16`) for the compiled CPU ops, "k_major" ([E, H, 2I], [E, I, H]) for PyTorch
        # matmuls, "split" (contiguous gate and up [E, I, H], down [E, H, I]) for the Triton kernel.
        self.layout = "checkpoint"
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

    def load_quantized(self, attr: str, q: QWeight) -> None:
        """The loader's hook for quantized expert weights (both projections come quantized: the loader
        fills gate_up and down in turn): held as they are, `layout` "quantized"."""
        assert attr in ("gate_up", "down"), attr
        del self._parameters[attr]
        setattr(self, f"q_{attr}", q)
        if hasattr(self, "q_gate_up") and hasattr(self, "q_down"):
            self.layout = "quantized"

    def prepare(self, use_kernel: bool) -> None:
        """Re-lay the expert weights for the expert path that will run (one layer at a time, so the
        process never holds two copies of the model)."""
        if self.layout != "checkpoint":
            return
        if "gate_up" not in self._parameters or "down" not in self._parameters:
            raise ValueError(
                "MoE experts: gate/up and down must be quantized alike (one is quantized, the other not)"
            )
        if use_kernel:
            i = self.inter
            self.w_gate = nn.Parameter(self.gate_up[:, :i].contiguous(), requires_grad=False)
            self.w_up = nn.Parameter(self.gate_up[:, i:].contiguous(), requires_grad=False)
            del self.gate_up
            self.layout = "split"
        else:
            if self._blocks():
                # One sequential stream per expert for the decode op's register tiles, where the K-major rows
                # are read as 16 strided ones (MoE layer at batch 16, E=64, H=512, I=128: 1.17 -> 1.04 ms).
                self.gate_up = nn.Parameter(block16(self.gate_up), requires_grad=False)
                self.down = nn.Parameter(block16(self.down), requires_grad=False)
                self.layout = "blocked"
            else:
                self.gate_up = nn.Parameter(self.gate_up.transpose(1, 2).contiguous(), requires_grad=False)
                self.down = nn.Parameter(self.down.transpose(1, 2).contiguous(), requires_grad=False)
                self.layout = "k_major"
            # The shared expert too: the compiled decode op runs it beside the routed ones.
            self.shared.gate_up.to_k_major()
            self.shared.down.to_k_major()

    def _blocks(self) -> bool:
        """Whether the experts take the blocked layout: fp32 on the CPU with the compiled ops there, and
        widths that tile by 16."""
        w = self.gate_up
        return (
            w.is_cpu
            and w.dtype is torch.float32
            and self.hidden % 16 == 0
            and self.inter % 16 == 0
            and cpu_decode.ops() is not None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.layout in ("blocked", "k_major"):
            ops = cpu_decode.ops()
            if (
                ops is not None
                and cpu_decode.usable(x, self.gate_up, self.down, self.router)
                and cpu_decode.experts_fit(x.shape[0] * self.top_k, self.gate_up, self.down)
                and isinstance(self.shared.gate_up.layout, KMajor)
                and isinstance(self.shared.down.layout, KMajor)
            ):  # CPU: router, routed and shared experts in one call (at any size with its AVX2 kernel)
                sh = self.shared
                out = ops.decode_moe(
                    x.contiguous(),
                    self.router,
                    self.router_bias,
                    self.top_k,
                    self.scale,
                    self.gate_up,
                    self.down,
                    float(self.limit),
                    sh.gate_up.weight,
                    sh.down.weight,
                    float(sh.limit),
                )
                return out.reshape(shape)
        if self.layout == "quantized":
            return self._forward_quantized(x).reshape(shape)
        weights, ids = route(x, self.router, self.router_bias, self.top_k, self.scale)
        if self.layout == "split":
            routed = fused_moe_kernel()(
                x, self.w_gate, self.w_up, self.down, weights, ids, swiglu_limit=self.limit
            )
        else:
            gu, dn = self.gate_up, self.down
            if self.layout == "checkpoint":
                gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
            routed = experts_torch(x, gu, dn, weights, ids, self.limit)
        return (routed + self.shared(x)).reshape(shape)

    def _forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        gu, dn = self.q_gate_up, self.q_down
        ops = cpu_decode.ops()
        if (
            ops is not None
            and gu.codes.is_cpu
            and cpu_decode.usable(x, self.router)
            and x.shape[0] * self.top_k <= 32 * self.n_experts
            and gu.fmt == dn.fmt
        ):  # decode and short prompts on the CPU: the codes decoded in registers
            routed = ops.decode_moe_q(
                x.contiguous(),
                self.router,
                self.router_bias,
                self.top_k,
                self.scale,
                gu.codes,
                gu.scales,
                gu.scale_2,
                dn.codes,
                dn.scales,
                dn.scale_2,
                gu.fmt_id,
                gu.group,
                dn.group,
                self.inter,
                float(self.limit),
            )
            return routed + self.shared(x)
        weights, ids = route(x, self.router, self.router_bias, self.top_k, self.scale)
        kernel = fused_moe_kernel() if x.is_cuda else None
        if kernel is not None:
            from advisor.engine.kernels.fused_moe_quant import fused_moe_quantized

            routed = fused_moe_quantized(x, gu, dn, weights, ids, swiglu_limit=self.limit)
        else:
            routed = experts_quantized(x, gu, dn, weights, ids, self.limit)
        return routed + self.shared(x)
