"""Quantized weights as the engine holds them in memory (`QWeight`), built from checkpoint tensors.

One layout for the three formats, so one compiled kernel family reads them (`engine/model/csrc`): the
output columns in panels of 16 (as `advisor.engine.model.layers.to_panels`), each panel its K input rows one after
the other, every row its 16 codes: 16 bytes for FP8 (e4m3), 8 for the 4-bit formats (byte j holds column
j in its low nibble and column j + 8 in its high one, so a register's two halves come from one load with
a mask and a shift). Scales per input group and output column, [K / group, N] (one contiguous vector of 16
per panel and group): fp32 for FP8 (each 128 x 128 block's scale repeated over its columns: fused
projections concatenate matrices whose blocks do not line up) and int4; NVFP4's e4m3 bytes stay bytes,
with the per-matrix `weight_scale_2` as one fp32 per column. Bytes beside the codes: 4/128 per weight for
FP8, 4/group for int4 (0.125 bit at group 128), 0 for NVFP4, where the checkpoint has 2/group for bf16
scales: resident bytes stay within a few percent of the file's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from advisor.engine.quant.formats import e2m1_decode, e4m3_decode, int4_codes, unpack_nibbles

_FMT_ID = {"fp8": 0, "int4": 1, "nvfp4": 2}


@dataclass(eq=False)
class QWeight:
    """A quantized [E, N, K] weight (E = 1 for a plain matrix) in the engine layout."""

    fmt: str
    experts: int
    out_features: int  # N (the panels hold ceil(N/16) * 16 columns, zero codes past N)
    in_features: int  # K
    group: int  # inputs per scale
    codes: torch.Tensor  # uint8 [E, N/16, K, 16 or 8]
    scales: torch.Tensor  # fp32 [E, K/group, Np] (fp8, int4) or e4m3 bytes uint8 [E, K/16, Np] (nvfp4)
    scale_2: torch.Tensor  # fp32 [E, Np] (nvfp4), empty otherwise
    input_scale: torch.Tensor | None = None  # NVFP4's activation scale, read and kept (W4A16 does not use it)

    @property
    def fmt_id(self) -> int:
        return _FMT_ID[self.fmt]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        extra = [self.input_scale] if self.input_scale is not None else []
        return [self.codes, self.scales, self.scale_2, *extra]

    def to(self, device: torch.device) -> QWeight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QWeight(
            self.fmt,
            self.experts,
            self.out_features,
            self.in_features,
            self.group,
            move(self.codes),
            move(self.scales),
            move(self.scale_2),
            move(self.input_scale),
        )

    def expert(self, e: int) -> QWeight:
        """Expert e as a one-matrix QWeight (views, no copy)."""
        s2 = self.scale_2[e : e + 1] if self.scale_2.numel() else self.scale_2
        return QWeight(
            self.fmt,
            1,
            self.out_features,
            self.in_features,
            self.group,
            self.codes[e : e + 1],
            self.scales[e : e + 1],
            s2,
        )

    def dequantize_k_major(self, e: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 K-major weights: [K, N] of expert e (or of the matrix), [E, K, N] with e None. With `out`
        (a [K, N] fp32 buffer) the result is written there (the compiled op where it runs)."""
        if e is not None and out is not None:
            from advisor.engine.model import cpu_decode  # lazily: the model package imports this one

            ops = cpu_decode.ops()
            if ops is not None and self.codes.is_cpu and out.is_cpu:
                ops.qdequant(
                    self.codes[e],
                    self.scales[e],
                    self._s2(e),
                    self.fmt_id,
                    self.group,
                    self.out_features,
                    out,
                )
                return out
        w = _dequant_torch(self) if e is None else _dequant_torch(self.expert(e))[0]
        if out is not None:
            return out.copy_(w)
        return w

    def dequantize(self) -> torch.Tensor:
        """fp32 in checkpoint layout [E, N, K] (for tests and the quantizer's dequantized copies)."""
        return _dequant_torch(self).transpose(1, 2).contiguous()

    def _s2(self, e: int) -> torch.Tensor:
        return self.scale_2[e] if self.scale_2.numel() else self.scale_2


def _lanes(q: QWeight) -> torch.Tensor:
    """codes [E, P, K, B] -> fp32 code values [E, P, K, 16] (unscaled)."""
    c = q.codes
    if q.fmt == "fp8":
        return e4m3_decode(c)
    lo, hi = (c & 15), (c >> 4)
    nib = torch.cat((lo, hi), dim=-1)
    return e2m1_decode(nib) if q.fmt == "nvfp4" else nib.float() - 8.0


def _col_scales(q: QWeight) -> torch.Tensor:
    """[E, K, Np] fp32: the scale of every (input, output column)."""
    s = e4m3_decode(q.scales) * q.scale_2[:, None, :] if q.fmt == "nvfp4" else q.scales.float()
    return s.repeat_interleave(q.group, dim=1)[:, : q.in_features]


def _dequant_torch(q: QWeight) -> torch.Tensor:
    """[E, K, N] fp32 (K-major)."""
    v = _lanes(q)  # [E, P, K, 16]
    E, P, K, _ = v.shape
    w = v.permute(0, 2, 1, 3).reshape(E, K, P * 16) * _col_scales(q)
    return w[..., : q.out_features]


# --------------------------------------------------------------------------- checkpoint tensors -> QWeight
def expected_parts(
    fmt: str, group: int, shape: tuple[int, ...], dtype: str
) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors (suffix -> (shape, safetensors dtype)) a quantized weight of logical shape [..., N, K]
    comes with. `dtype`: the stored scale dtype where the format leaves it free (int4)."""
    *lead, n, k = shape
    lead = tuple(lead)
    if fmt == "fp8":
        return {"weight_scale_inv": (lead + (-(-n // group), -(-k // group)), "F32")}
    if fmt == "nvfp4":
        return {"weight_scale": (lead + (n, k // 16), "F8_E4M3")}
    return {"weight_scale": (lead + (n, k // group), dtype), "weight_shape": ((len(shape),), "I64")}


def from_checkpoint(fmt: str, group: int, t: dict[str, torch.Tensor], shape: tuple[int, ...]) -> QWeight:
    """One checkpoint weight's tensors (suffix -> tensor, as stored) -> QWeight. Leading dims: experts."""
    *lead, n, k = shape
    E = 1
    for d in lead:
        E *= d
    if fmt == "fp8":
        codes = t["weight"].view(torch.uint8).reshape(E, n, k)
        blk = t["weight_scale_inv"].float().reshape(E, -(-n // group), -(-k // group))
        # the block scale of every output column: [E, K/b, N]
        scales = blk.repeat_interleave(group, dim=1)[:, :n].transpose(1, 2).contiguous()
        s2 = torch.empty(0)
    elif fmt == "nvfp4":
        codes = unpack_nibbles(t["weight"].reshape(E, n, k // 2))
        scales = t["weight_scale"].view(torch.uint8).reshape(E, n, k // 16).transpose(1, 2).contiguous()
        s2 = t["weight_scale_2"].float().reshape(-1)
        s2 = (s2.expand(E) if s2.numel() == 1 else s2.reshape(E))[:, None].expand(E, n).contiguous()
    else:
        codes = (int4_codes(t["weight_packed"]).reshape(E, n, k) + 8).to(torch.uint8)
        scales = t["weight_scale"].float().reshape(E, n, k // group).transpose(1, 2).contiguous()
        s2 = torch.empty(0)
    inp = t.get("input_scale")
    return _panelled(fmt, group, codes, scales, s2, n, k, None if inp is None else inp.float())


def _panelled(fmt, group, codes, scales, s2, n, k, input_scale=None) -> QWeight:
    """codes [E, N, K] (one code per byte), scales [E, K/g, N], s2 [E, N] -> QWeight (N padded to 16)."""
    E = codes.shape[0]
    p = -(-n // 16)
    pad = p * 16 - n
    if pad:
        zero = 0 if fmt != "int4" else 8  # the code of 0.0
        codes = torch.cat([codes, codes.new_full((E, pad, k), zero)], 1)
        scales = torch.cat([scales, scales.new_zeros(E, scales.shape[1], pad)], 2)
        if s2.numel():
            s2 = torch.cat([s2, s2.new_zeros(E, pad)], 1)
    lanes = codes.view(E, p, 16, k).transpose(2, 3)  # [E, P, K, 16]
    if fmt != "fp8":
        lanes = lanes[..., :8] | (lanes[..., 8:] << 4)
    return QWeight(fmt, E, n, k, group, lanes.contiguous(), scales.contiguous(), s2.contiguous(), input_scale)


def concat_outputs(parts: list[QWeight]) -> QWeight:
    """Matrices fused along their outputs (q, k, v, g; gate and up), as `torch.cat(dim=N)` would."""
    if len(parts) == 1:
        return parts[0]
    a = parts[0]
    if any(
        p.fmt != a.fmt or p.group != a.group or p.in_features != a.in_features or p.experts != a.experts
        for p in parts
    ):
        raise ValueError("fused parts differ in format, group, inputs or experts")
    codes, scales, s2 = [], [], []
    for q in parts:
        v = q.codes
        if q.fmt != "fp8":
            v = torch.cat((v & 15, v >> 4), dim=-1)
        E, P, K, _ = v.shape
        codes.append(v.transpose(2, 3).reshape(E, P * 16, K)[:, : q.out_features])
        scales.append(q.scales[..., : q.out_features])
        if q.scale_2.numel():
            s2.append(q.scale_2[:, : q.out_features])
    n = sum(q.out_features for q in parts)
    inp = [q.input_scale for q in parts if q.input_scale is not None]
    return _panelled(
        a.fmt,
        a.group,
        torch.cat(codes, 1),
        torch.cat(scales, 2),
        torch.cat(s2, 1) if s2 else torch.empty(0),
        n,
        a.in_features,
        torch.stack([i.reshape(-1).max() for i in inp]).max() if inp else None,
    )


# -------------------------------------------------------------------------------------- scratch buffers
_local = threading.local()


def scratch(numel: int) -> torch.Tensor:
    """A per-thread fp32 buffer of at least `numel` elements, reused across calls (the per-expert and
    per-projection dequantization of long inputs writes there instead of allocating each time)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float32)
        _local.buf = buf
    return buf[:numel]


def weight_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of every tensor the modules hold (parameters, buffers, re-laid and quantized weights), each
    storage counted once: what a loaded model keeps resident for its weights."""
    seen: dict[tuple[int, int], int] = {}

    def add(t: object) -> None:
        if isinstance(t, torch.Tensor):
            if t.device.type != "meta" and t.numel():
                st = t.untyped_storage()
                seen[(st.data_ptr(), t.device.index or 0)] = st.nbytes()
        elif isinstance(t, QWeight):
            for x in t.tensors():
                add(x)
        elif hasattr(t, "__dataclass_fields__"):  # a weight layout holding its tensor
            for f in t.__dataclass_fields__:
                add(getattr(t, f))

    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            for t in list(m._parameters.values()) + list(m._buffers.values()):
                add(t)
            for v in vars(m).values():
                if not isinstance(v, dict):
                    add(v)
    return sum(seen.values())
