"""Small building blocks: zero-centred RMSNorm, partial NeoX RoPE (with llama3 scaling), clamped SwiGLU MLP."""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from engine import cpu_decode
from engine.config import RopeSpec

# parameter name -> ([(checkpoint tensor name, expected shape), ...], dim the parts are concatenated on)
Spec = dict[str, tuple[list[tuple[str, tuple[int, ...]]], int]]


class Linear(nn.Module):
    """A bias-free projection whose weight may be stored transposed, or packed for oneDNN.

    Loaded as [out, in] (checkpoint layout). On the CPU, `relayout` picks the layout this CPU's kernels
    read fastest. Measured on the 2-core AVX2 CPU here (fp32, weights not in cache, one row / sixteen):
    - projections from >= 512 inputs with >= 2^18 weights are packed once into oneDNN's blocked layout
      and run through its linear: the 16384 x 512 head 1.8 against 2.0 ms for one row and 3.6 against
      9.4 ms for sixteen; attention's 1036 x 512 131 / 238 us against 128 / 326 us for MKL on [in, out],
      its 512 x 768 output 95 / 178 against 123 / 209 us for MKL on [out, in]. The plain weight is
      dropped: one copy, not two. `ADVISOR_CPU_ONEDNN=0` keeps every projection on MKL.
    - smaller projections with out > in are stored as [in, out] (a shared expert's 512 x 128 down:
      23 us through MKL, 35 on [out, in], 39 through oneDNN), the rest stay [out, in].
    """

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.transposed = False
        self.packed: torch.Tensor | None = None  # oneDNN-packed weight (inference on the CPU only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return x @ self.weight if self.transposed else F.linear(x, self.weight)

    def to_k_major(self) -> None:
        """Store the weight as [in, out] whatever its shape (for kernels that read it that way)."""
        if not self.transposed and self.packed is None:
            self.weight = nn.Parameter(self.weight.t().contiguous(), requires_grad=False)
            self.transposed = True

    def relayout(self) -> None:
        if self.transposed or self.packed is not None:
            return
        out_f, in_f = self.weight.shape
        if in_f >= 512 and out_f * in_f >= 2**18 and self.weight.dtype == torch.float32 and _onednn_linear():
            try:  # the batch hint only tunes the packing; any number of rows runs
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 16)
                self.weight = None
                return
            except RuntimeError:  # an op this build lacks at runtime: MKL below
                self.packed = None
        if out_f > in_f:
            self.to_k_major()


def _onednn_linear() -> bool:
    return (
        os.environ.get("ADVISOR_CPU_ONEDNN", "1") != "0"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class RMSNorm(nn.Module):
    """Gemma-style RMSNorm: normalise in fp32, scale by (1 + w), cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self._scale: torch.Tensor | None = None  # (1 + w) in fp32, derived once from the loaded weight
        self._scale_of: torch.Tensor | None = None

    def scale(self) -> torch.Tensor:
        w = self.weight
        if self._scale_of is not w:
            self._scale = 1.0 + w.float()
            object.__setattr__(self, "_scale_of", w)  # a plain attribute, not a second registered parameter
        return self._scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = cpu_decode.ops()
        if ops is not None and cpu_decode.usable(x, self.weight):
            return ops.rms_norm(x.contiguous(), None, self.scale(), self.eps)[1]
        # Written out: on the CPU, F.rms_norm falls back to a slower composite of more ops.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale()).type_as(x)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, the norm of that sum): a block's residual add and the next norm, in one pass
        where the compiled CPU ops run."""
        ops = cpu_decode.ops()
        if ops is not None and cpu_decode.usable(x, residual, self.weight) and x.shape == residual.shape:
            s, y = ops.rms_norm(x.contiguous(), residual.contiguous(), self.scale(), self.eps)
            return s, y
        s = x + residual
        return s, self(s)


def rope_inv_freq(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse frequencies for the rotated part of a head (llama3 scaling when asked)."""
    dim = int(head_dim * spec.partial_rotary_factor)
    inv = 1.0 / (spec.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if spec.rope_type != "llama3":
        return inv
    old = spec.original_max_position_embeddings
    low_wl, high_wl = old / spec.low_freq_factor, old / spec.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wl, inv / spec.factor, inv)
    smooth = (old / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
    return torch.where(medium, smoothed, scaled)


class Rope:
    """RoPE of one attention type at a step's positions [B, T]; the cos/sin tables are built on first use,
    once per step for all the layers of that type (an attention type with no layer builds none)."""

    def __init__(self, inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
        self.inv_freq, self.positions, self.dtype = inv_freq, positions, dtype

    @functools.cached_property
    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(self.inv_freq, self.positions, self.dtype)


def rope_tables(
    inv_freq: dict[str, torch.Tensor], positions: torch.Tensor, dtype: torch.dtype
) -> dict[str, Rope]:
    """One `Rope` per attention type."""
    return {t: Rope(f, positions, dtype) for t, f in inv_freq.items()}


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions [B, T] -> cos, sin [B, T, 1, rot_dim] (NeoX layout: halves repeated)."""
    freqs = positions.clamp(min=0)[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, :, None, :], emb.sin().to(dtype)[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; rotates the first cos.shape[-1] dims (rotate-halves), passes the rest through."""
    rd = cos.shape[-1]
    if rd == 0:
        return x
    rot, rest = x[..., :rd], x[..., rd:]
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def swiglu(gate_up: torch.Tensor, limit: float) -> torch.Tensor:
    """[.., 2I] -> [.., I]: silu(gate) * up, with the Step clamp when limit > 0."""
    gate, up = gate_up.chunk(2, dim=-1)
    gate = F.silu(gate)
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return gate * up


class MLP(nn.Module):
    """Dense SwiGLU MLP (also the MoE shared expert); gate and up fused into one matrix at load."""

    def __init__(self, hidden: int, inter: int, limit: float):
        super().__init__()
        self.limit = limit
        self.hidden, self.inter = hidden, inter
        self.gate_up = Linear(2 * inter, hidden)
        self.down = Linear(hidden, inter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(swiglu(self.gate_up(x), self.limit))

    def checkpoint_spec(self, prefix: str) -> Spec:
        h, i = self.hidden, self.inter
        return {
            "gate_up.weight": (
                [(f"{prefix}.gate_proj.weight", (i, h)), (f"{prefix}.up_proj.weight", (i, h))],
                0,
            ),
            "down.weight": ([(f"{prefix}.down_proj.weight", (h, i))], 0),
        }
