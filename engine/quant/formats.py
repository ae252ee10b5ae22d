"""The three quantized weight formats, in the layouts their exports publish: quantize and dequantize.

Every function works on checkpoint-layout weights [..., out, in] (any leading dims: the Step checkpoints
pack the routed experts as one [E, out, in] tensor per projection) and returns checkpoint-layout tensors.
- FP8 with block scales (the DeepSeek-V3 / Qwen3 FP8 exports vLLM and SGLang load): `weight` in
  float8_e4m3fn, `weight_scale_inv` fp32 [..., ceil(out/128), ceil(in/128)], the dequantization multiplier
  of each 128 x 128 block (despite the name: w = q * weight_scale_inv).
- NVFP4 (NVIDIA ModelOpt): `weight` uint8 [..., out, in/2], two e2m1 codes per byte, element 2j in the low
  nibble; `weight_scale` float8_e4m3fn [..., out, in/16], one per 16 inputs; `weight_scale_2` fp32, one per
  matrix ([] for a 2-D weight, [E] for packed experts); w = e2m1 * weight_scale * weight_scale_2.
- int4 W4A16 (compressed-tensors `pack-quantized`, as llm-compressor writes it): `weight_packed` int32
  [..., out, in/8], eight 4-bit codes per word, element 8j+i in bits 4i..4i+3, each the signed value
  q in [-8, 7] offset by 8; `weight_scale` [..., out, in/group] (symmetric: no zero point);
  `weight_shape` int64, the unpacked shape; w = q * weight_scale.

Torch's float8_e4m3fn is the e4m3 definition used throughout (tests check it against the bit-level one).
"""

from __future__ import annotations

import torch
from advisor.engine.quant.scheme import FP8_BLOCK, NVFP4_GROUP

FP8_MAX = 448.0  # largest finite e4m3fn
E2M1_MAX = 6.0

# e2m1 code -> value: bit 3 the sign, bits 2-1 the exponent (bias 1), bit 0 the mantissa; exponent 0 is
# subnormal (0 and 0.5).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Midpoints between neighbouring magnitudes, and whether a tie there rounds up: round half to even, the
# even neighbour being the one whose mantissa bit is 0 (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, ...).
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_TIE_UP = (False, True, False, True, False, True, False)


class FormatError(ValueError):
    """A weight whose shape the format cannot hold (e.g. inputs not a multiple of the group)."""


# ----------------------------------------------------------------------------------------- scalar codes
def e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """float -> e4m3fn, saturating at +-448 (torch's cast would give NaN past the range)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def e4m3_decode(x: torch.Tensor) -> torch.Tensor:
    """e4m3fn (as float8_e4m3fn or its uint8 bytes) -> fp32."""
    if x.dtype is torch.uint8:
        x = x.view(torch.float8_e4m3fn)
    return x.float()


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """float -> e2m1 codes (uint8, 0..15): nearest value, ties to even, saturating at +-6."""
    a = x.float().abs()
    mag = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for t, up in zip(_E2M1_MIDPOINTS, _E2M1_TIE_UP, strict=True):
        mag += (a >= t) if up else (a > t)
    sign = (torch.signbit(x.float()) & (mag > 0)).to(torch.uint8) << 3  # no negative zero written
    return mag | sign


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (any integer dtype, 0..15) -> fp32."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., 2n] codes 0..15 -> [..., n] uint8, element 2j in the low nibble of byte j."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] uint8 -> [..., 2n] codes (uint8)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


# ------------------------------------------------------------------------------------ FP8 block scales
def _blocks(w: torch.Tensor, b: int) -> tuple[torch.Tensor, int, int]:
    """w [..., N, K] zero-padded to multiples of b, viewed as [..., N/b, b, K/b, b]."""
    *lead, n, k = w.shape
    nb, kb = -(-n // b), -(-k // b)
    p = torch.nn.functional.pad(w, (0, kb * b - k, 0, nb * b - n))
    return p.view(*lead, nb, b, kb, b), n, k


def fp8_quantize(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (float8_e4m3fn [..., N, K], weight_scale_inv fp32 [..., ceil(N/b), ceil(K/b)])."""
    blocks, n, k = _blocks(w.float(), block)
    amax = blocks.abs().amax(dim=(-3, -1), keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = e4m3_encode(blocks / scale)
    *lead, nb, _, kb, _ = blocks.shape
    q = q.view(*lead, nb * block, kb * block)[..., :n, :k].contiguous()
    return q, scale.reshape(*lead, nb, kb).contiguous()


def fp8_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """The inverse: e4m3 [..., N, K] times each 128 x 128 block's scale -> fp32 [..., N, K]."""
    n, k = q.shape[-2:]
    s = scale_inv.float().repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :n, :k]
    return e4m3_decode(q) * s


# ----------------------------------------------------------------------------------------------- NVFP4
def nvfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (packed uint8 [..., N, K/2], weight_scale e4m3 [..., N, K/16], weight_scale_2 fp32
    [...]: one per matrix). ModelOpt's recipe: the per-matrix scale maps the matrix's amax to
    6 * 448 (the largest e2m1 times the largest e4m3), each group's e4m3 scale is its amax / 6 over that."""
    *lead, n, k = w.shape
    if k % NVFP4_GROUP:
        raise FormatError(f"NVFP4 needs inputs in multiples of {NVFP4_GROUP}, got {k}")
    wf = w.float()
    amax = wf.abs().flatten(-2).amax(-1)
    scale_2 = torch.where(amax > 0, amax / (E2M1_MAX * FP8_MAX), torch.ones_like(amax))
    g = wf.view(*lead, n, k // NVFP4_GROUP, NVFP4_GROUP)
    s2 = scale_2[..., None, None]
    scale = e4m3_encode(g.abs().amax(-1) / E2M1_MAX / s2)
    eff = scale.float() * s2
    eff = torch.where(eff > 0, eff, torch.ones_like(eff))
    codes = e2m1_encode(g / eff[..., None]).view(*lead, n, k)
    return pack_nibbles(codes), scale, scale_2


def nvfp4_dequantize(packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """The inverse -> fp32 [..., N, K]. `scale_2` one per matrix: [] or the leading dims."""
    v = e2m1_decode(unpack_nibbles(packed))
    *lead, n, k = v.shape
    s = e4m3_decode(scale) * scale_2.float().reshape(*scale_2.shape, 1, 1)
    return (v.view(*lead, n, k // NVFP4_GROUP, NVFP4_GROUP) * s[..., None]).view(*lead, n, k)


# ----------------------------------------------------------------------------------------- int4 W4A16
def int4_quantize(
    w: torch.Tensor, group: int, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (weight_packed int32 [..., N, K/8], weight_scale [..., N, K/group], weight_shape).
    Symmetric, as compressed-tensors computes it: scale = amax / 7.5 (half the code range), q = round(w /
    scale) clamped to [-8, 7]. The scale is stored in `scale_dtype` (default the weight's) and q is computed
    against that stored value, so dequantizing the file gives exactly what was rounded."""
    *lead, n, k = w.shape
    if k % group or group % 8:
        raise FormatError(f"int4 with group {group} needs inputs in multiples of the group, got {k}")
    wf = w.float().view(*lead, n, k // group, group)
    amax = wf.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 7.5, torch.ones_like(amax)).to(scale_dtype or w.dtype)
    q = torch.round(wf / scale.float()[..., None]).clamp(-8, 7).to(torch.int32).view(*lead, n, k)
    u = (q + 8).view(*lead, n, k // 8, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=w.device)
    packed = (u << shifts).sum(-1, dtype=torch.int64)  # bit 31 set for codes >= 8 in the last slot
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.contiguous(), scale.contiguous(), torch.tensor([*lead, n, k], dtype=torch.int64)


def int4_codes(packed: torch.Tensor) -> torch.Tensor:
    """weight_packed int32 [..., N, K/8] -> the signed values q int8 [..., N, K]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    u = (packed[..., None] >> shifts) & 15
    return (u.flatten(-2) - 8).to(torch.int8)


def int4_dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The inverse -> fp32 [..., N, K] (the group is K over the scale's last dim)."""
    q = int4_codes(packed).float()
    *lead, n, k = q.shape
    groups = scale.shape[-1]
    return (q.view(*lead, n, groups, k // groups) * scale.float()[..., None]).view(*lead, n, k)
