"""Small building blocks: zero-centred RMSNorm, partial NeoX RoPE (with llama3 scaling), clamped SwiGLU MLP."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from advisor.engine.model import cpu_decode
from advisor.engine.model.config import RopeSpec
from advisor.engine.quant.packed import QWeight, scratch
from torch import nn

# parameter name -> ([(checkpoint tensor name, expected shape), ...], dim the parts are concatenated on)
Spec = dict[str, tuple[list[tuple[str, tuple[int, ...]]], int]]


class WeightLayout:
    """How a `Linear` stores its weight and multiplies by it. One is chosen per projection at load
    (`Linear.relayout`, `Linear.to_k_major`) and `Linear.forward` goes through it.

    The layouts that keep a plain matrix ([out, in] or [in, out]) read it from the Linear's registered
    `weight` parameter and hold nothing themselves, so the loader (which replaces parameters), `.to()` and
    training keep seeing it; the others hold their re-laid tensor and the parameter is None (the plain copy
    dropped: one copy of the weights). `forward` takes the Linear rather than its weight: the parameter
    lookup costs ~0.5 us a call, which a decode step's projections do not pay where they do not use it.
    """

    def forward(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        raise NotImplementedError


class RowMajor(WeightLayout):
    """The checkpoint layout, weight [out, in]: until a projection is re-laid, and where nothing is faster."""

    def forward(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        return F.linear(x, linear.weight)


class KMajor(WeightLayout):
    """Weight stored transposed, [in, out]: MKL streams those matrix-vector products faster when out > in;
    the compiled expert op reads the shared expert this way."""

    def forward(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        return x @ linear.weight


@dataclass(eq=False)
class OneDNNPacked(WeightLayout):
    """The weight packed once into oneDNN's blocked layout, run through its linear."""

    packed: torch.Tensor

    def forward(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


@dataclass(eq=False)
class ColumnPanels(WeightLayout):
    """The weight in 16-column panels [ceil(out/16), in, 16] (`to_panels`) for the compiled `panel_linear`
    op, up to `PANEL_ROWS` rows; more rows unpack the panels for the call and run oneDNN (or MKL)."""

    panels: torch.Tensor
    out_features: int

    def forward(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        n = self.out_features
        rows = x.reshape(-1, x.shape[-1])
        ops = cpu_decode.ops()
        if rows.shape[0] <= PANEL_ROWS and ops is not None and cpu_decode.usable(rows):
            return ops.panel_linear(rows.contiguous(), self.panels, n).view(*x.shape[:-1], n)
        w = from_panels(self.panels, n)
        if _onednn_linear() and x.dtype is torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return F.linear(x, w)


@dataclass(eq=False)
class Quantized(WeightLayout):
    """A quantized weight (FP8, int4, NVFP4; `advisor.engine.quant.packed.QWeight`), kept quantized. On the CPU in
    fp32 with the compiled ops, up to `QUANT_ROWS` rows go through `qlinear`, which decodes the codes in
    registers; longer inputs (and the PyTorch path) dequantize the weight into a reused per-thread buffer
    and run one GEMM on it."""

    q: QWeight

    def forward(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        q = self.q
        n, k = q.out_features, q.in_features
        rows = x.reshape(-1, k)
        ops = cpu_decode.ops()
        if q.codes.is_cpu and ops is not None and cpu_decode.usable(rows):
            if rows.shape[0] <= QUANT_ROWS:
                s2 = q.scale_2[0] if q.scale_2.numel() else q.scale_2
                out = ops.qlinear(rows.contiguous(), q.codes[0], q.scales[0], s2, q.fmt_id, q.group, n)
                return out.view(*x.shape[:-1], n)
            w = q.dequantize_k_major(0, out=scratch(k * n).view(k, n))
        else:
            w = q.dequantize_k_major(0)
        return (rows @ w.to(x.dtype)).view(*x.shape[:-1], n)


# Up to this many rows a quantized projection decodes in registers; beyond, one dequantization into the
# scratch buffer and a GEMM (the dequantization is then a small share of the work).
QUANT_ROWS = 64


class Linear(nn.Module):
    """A bias-free projection whose weight is held in one `WeightLayout`, chosen at load.

    Loaded as [out, in] (checkpoint layout, `RowMajor`). On the CPU, `relayout` picks the layout this CPU's
    kernels read fastest:
    - fp32 with the compiled CPU ops there: `ColumnPanels` [ceil(out/16), in, 16] (`to_panels`), which the
      `panel_linear` op reads as one sequential stream for up to 128 rows (decode, short prompts); longer
      inputs unpack the panels for the call and run oneDNN's linear on the plain weight (as fast as on its
      packed one at prefill sizes here; the copy adds ~5% to those GEMMs). Measured with the op's
      generic loop on a 2-core Zen 5 with 512-bit registers (weights not in cache, 16 rows / one): the
      16384 x 512 head 0.96 / 0.84 ms against 1.27 / 0.96 for oneDNN's packed weight, attention's 1036 x 512
      68 / 63 us against 104 / 82. AVX2 CPUs run the op's AVX2 kernel (`python -m advisor.engine.bench_linear`).
    - otherwise, projections from >= 512 inputs with >= 2^18 weights are packed once into oneDNN's blocked
      layout (`OneDNNPacked`) and run through its linear (on the 2-core AVX2 CPU measured before: the head
      3.6 against 9.4 ms for sixteen rows through MKL). `ADVISOR_CPU_ONEDNN=0` keeps those on MKL.
    - smaller projections with out > in are stored as [in, out] (`KMajor`; a shared expert's 512 x 128 down:
      23 us through MKL, 35 on [out, in], 39 through oneDNN), the rest stay `RowMajor`.
    """

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.layout: WeightLayout = RowMajor()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layout.forward(x, self)

    def load_quantized(self, attr: str, q: QWeight) -> None:
        """The loader's hook for a quantized checkpoint weight: held as it is (`Quantized`), no fp32 copy."""
        assert attr == "weight", attr
        self.weight = None
        self.layout = Quantized(q)

    def to_k_major(self) -> None:
        """Store the weight as [in, out] whatever its shape (for kernels that read it that way)."""
        if isinstance(self.layout, RowMajor):
            self.weight = nn.Parameter(self.weight.t().contiguous(), requires_grad=False)
            self.layout = KMajor()

    def relayout(self) -> None:
        """Choose this CPU's layout (once: a projection already re-laid keeps its layout)."""
        if not isinstance(self.layout, RowMajor):
            return
        w = self.weight
        out_f, in_f = w.shape
        if w.is_cpu and w.dtype is torch.float32 and cpu_decode.ops() is not None:
            self._hold(ColumnPanels(to_panels(w.detach()), out_f))
            return
        if in_f >= 512 and out_f * in_f >= 2**18 and w.dtype == torch.float32 and _onednn_linear():
            try:  # the batch hint only tunes the packing; any number of rows runs
                self._hold(OneDNNPacked(torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16)))
                return
            except RuntimeError:  # an op this build lacks at runtime: MKL below
                pass
        if out_f > in_f:
            self.to_k_major()

    def _hold(self, layout: WeightLayout) -> None:
        """Adopt a layout that holds its own tensor; the plain weight is dropped (one copy, not two)."""
        self.layout = layout
        self.weight = None


# Up to this many rows a panel-laid projection runs the compiled op. Measured with its generic loop (512-bit
# registers) against the unpacked weight through oneDNN (the alternative for these layouts, before the copy):
# 128 rows of the 1036 x 512 qkvg 0.37 against 0.45 ms, the head 10.9 against 11.7; at 2048 rows oneDNN leads
# (5.3 against 6.1). Not yet re-measured for the AVX2 kernel (`advisor.engine.bench_linear --rows 64 128`).
PANEL_ROWS = 128


def to_panels(w: torch.Tensor) -> torch.Tensor:
    """[out, in] -> column panels [ceil(out/16), in, 16]: panel p holds output columns p*16.., zeros past out."""
    n, k = w.shape
    p = -(-n // 16)
    padded = w if n == p * 16 else torch.cat([w, w.new_zeros(p * 16 - n, k)])
    return padded.view(p, 16, k).transpose(1, 2).contiguous()


def from_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """Column panels -> the [out, in] weight (a copy)."""
    p, k, _ = panels.shape
    return panels.transpose(1, 2).reshape(p * 16, k)[:n]


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
