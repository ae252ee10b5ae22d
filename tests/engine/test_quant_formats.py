"""The quantized formats against their definitions: e4m3 / e2m1 value tables exhaustively, FP8 block and
NVFP4 dequantization against a test-only reference written from the published definitions, int4 against
the `compressed-tensors` package, and the engine's in-memory layout against the checkpoint's."""

from __future__ import annotations

import math

import pytest
import torch
from advisor.engine.quant import formats as F
from advisor.engine.quant.packed import concat_outputs, from_checkpoint


# ---------------------------------------------------------------- reference decoders from the bit layouts
def ref_e4m3(code: int) -> float:
    """OCP FP8 E4M3 ('fn': no infinities, S.1111.111 is NaN): bias 7, subnormals at exponent 0."""
    s, e, m = code >> 7, (code >> 3) & 15, code & 7
    if e == 15 and m == 7:
        return math.nan
    v = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -v if s else v


def ref_e2m1(code: int) -> float:
    """OCP MX FP4 E2M1: bias 1, one mantissa bit, no inf/NaN."""
    s, e, m = code >> 3, (code >> 1) & 3, code & 1
    v = (m / 2) if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
    return -v if s else v


def test_e4m3_table_is_torch_float8_e4m3fn_for_all_256_codes():
    codes = torch.arange(256, dtype=torch.uint8)
    ours = F.e4m3_decode(codes).tolist()
    theirs = codes.view(torch.float8_e4m3fn).float().tolist()
    for c in range(256):
        ref = ref_e4m3(c)
        if math.isnan(ref):
            assert math.isnan(ours[c]) and math.isnan(theirs[c])
        else:
            assert ours[c] == ref == theirs[c], c


def test_e4m3_encode_rounds_to_nearest_and_saturates():
    finite = [c for c in range(256) if not math.isnan(ref_e4m3(c))]
    vals = torch.tensor([ref_e4m3(c) for c in finite])
    assert torch.equal(F.e4m3_decode(F.e4m3_encode(vals)), vals)  # representable values round-trip
    assert F.e4m3_decode(F.e4m3_encode(torch.tensor([1e6, -1e6]))).tolist() == [448.0, -448.0]
    x = torch.randn(5000) * 50
    err = (F.e4m3_decode(F.e4m3_encode(x)) - x).abs()
    grid = torch.sort(vals.unique()).values
    nearest = (x[:, None] - grid[None]).abs().min(1).values
    assert torch.allclose(err, nearest)


def test_e2m1_table_and_encoding_for_all_16_codes():
    codes = torch.arange(16, dtype=torch.uint8)
    assert F.e2m1_decode(codes).tolist() == [ref_e2m1(c) for c in range(16)]
    # every value round-trips (negative zero is written as zero)
    vals = F.e2m1_decode(codes)
    back = F.e2m1_encode(vals)
    assert F.e2m1_decode(back).tolist() == vals.tolist()
    # round half to even, saturation
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.3, -5.1, 0.26])
    assert F.e2m1_decode(F.e2m1_encode(x)).tolist() == [0, 1, 1, 2, 2, 4, 4, 6, -0.5, -6, 0.5]


def test_nibble_packing_puts_the_even_element_low():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = F.pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(F.unpack_nibbles(packed), codes)


# ------------------------------------------------------------------------------- checkpoint-level formats
def _w(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.logspace(-2, 1, shape[-1])  # mixed magnitudes


def test_fp8_block_dequant_matches_the_definition_elementwise():
    w = _w(3, 200, 260)  # blocks that do not divide the shape
    q, s = F.fp8_quantize(w)
    assert q.dtype is torch.float8_e4m3fn and q.shape == w.shape and s.shape == (3, 2, 3)
    deq = F.fp8_dequantize(q, s)
    qb = q.view(torch.uint8)
    for e, i, j in [(0, 0, 0), (1, 127, 128), (2, 199, 259), (0, 130, 5), (2, 64, 255)]:
        ref = ref_e4m3(int(qb[e, i, j])) * float(s[e, i // 128, j // 128])
        assert float(deq[e, i, j]) == pytest.approx(ref, rel=1e-6)
    # every block's largest magnitude maps to 448 (the scale is amax / 448) and the error is half a step
    assert float(F.e4m3_decode(q).abs().amax()) == 448.0
    assert ((deq - w).abs() <= w.abs() * 2**-4 + s.max() * 2**-10).all()  # subnormals: half their step


def test_nvfp4_dequant_matches_the_definition_elementwise():
    w = _w(2, 48, 64, seed=1)
    packed, scale, s2 = F.nvfp4_quantize(w)
    assert packed.dtype is torch.uint8 and packed.shape == (2, 48, 32)
    assert scale.dtype is torch.float8_e4m3fn and scale.shape == (2, 48, 4) and s2.shape == (2,)
    deq = F.nvfp4_dequantize(packed, scale, s2)
    sb = scale.view(torch.uint8)
    for e, i, j in [(0, 0, 0), (1, 47, 63), (0, 10, 17), (1, 3, 32)]:
        byte = int(packed[e, i, j // 2])
        code = byte & 15 if j % 2 == 0 else byte >> 4
        ref = ref_e2m1(code) * ref_e4m3(int(sb[e, i, j // 16])) * float(s2[e])
        assert float(deq[e, i, j]) == pytest.approx(ref, rel=1e-6)
    rel = (deq - w).norm() / w.norm()
    assert rel < 0.15  # 4-bit: a few percent of the signal
    # 2-D weights get one scalar weight_scale_2
    p2, s2d, g2 = F.nvfp4_quantize(w[0])
    assert g2.shape == () and torch.equal(F.nvfp4_dequantize(p2, s2d, g2), deq[0])


@pytest.mark.parametrize("group", [32, 128])
def test_int4_pack_quantized_matches_compressed_tensors(group):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    assert ct is not None
    w = _w(40, 256, seed=2).to(torch.bfloat16)
    packed, scale, shape = F.int4_quantize(w, group)
    assert packed.dtype is torch.int32 and packed.shape == (40, 32) and scale.shape == (40, 256 // group)
    assert scale.dtype is torch.bfloat16 and shape.tolist() == [40, 256]
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    # their quantization of the weight with our scales gives our codes, and their packing our words
    q_theirs = quantize(
        w.float(), scale.float(), torch.zeros_like(scale, dtype=torch.int8), args, dtype=torch.int8
    )
    assert torch.equal(F.int4_codes(packed), q_theirs)
    assert torch.equal(pack_to_int32(q_theirs, 4), packed)
    # their unpacking and dequantization of our file equals ours
    deq_theirs = dequantize(unpack_from_int32(packed, 4, torch.Size([40, 256])), scale.float(), None, args)
    assert torch.allclose(F.int4_dequantize(packed, scale), deq_theirs.float(), rtol=0, atol=0)
    # 3-D experts pack slice by slice
    w3 = _w(3, 16, 128, seed=3)
    p3, s3, _ = F.int4_quantize(w3, 32)
    assert torch.equal(pack_to_int32(F.int4_codes(p3), 4), p3)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4", "int4"])
def test_engine_layout_dequantizes_to_the_checkpoint_dequantization(fmt):
    w = _w(3, 40, 96, seed=4)  # 40 outputs: a padded last panel
    t, ref = _checkpoint_tensors(fmt, w)
    q = from_checkpoint(fmt, 32 if fmt == "int4" else (128 if fmt == "fp8" else 16), t, tuple(w.shape))
    assert q.codes.shape == (3, 3, 96, 16 if fmt == "fp8" else 8)
    assert torch.equal(q.dequantize(), ref)
    assert torch.equal(q.dequantize_k_major(e=1), ref[1].t())
    # fused along outputs, as q/k/v or gate/up are
    w2 = _w(3, 24, 96, seed=5)
    t2, ref2 = _checkpoint_tensors(fmt, w2)
    q2 = from_checkpoint(fmt, q.group, t2, tuple(w2.shape))
    fused = concat_outputs([q, q2])
    assert fused.out_features == 64
    assert torch.equal(fused.dequantize(), torch.cat([ref, ref2], 1))


def _checkpoint_tensors(fmt, w):
    if fmt == "fp8":
        q, s = F.fp8_quantize(w)
        return {"weight": q, "weight_scale_inv": s}, F.fp8_dequantize(q, s)
    if fmt == "nvfp4":
        p, s, s2 = F.nvfp4_quantize(w)
        return {"weight": p, "weight_scale": s, "weight_scale_2": s2}, F.nvfp4_dequantize(p, s, s2)
    p, s, shape = F.int4_quantize(w, 32)
    return {"weight_packed": p, "weight_scale": s, "weight_shape": shape}, F.int4_dequantize(p, s)
