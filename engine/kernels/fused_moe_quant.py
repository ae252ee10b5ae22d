"""Fused MoE with quantized expert weights (W8A16 FP8 block scales, W4A16 int4 groups and NVFP4), in Triton.

Same four launches as `fused_moe` (alignment, gate/up grouped GEMM with the clamped SwiGLU, down grouped
GEMM times the routing weight, combine), but the weight tiles are read in the engine's quantized layout
(`engine.quant.packed.QWeight`: 16-column panels of codes, per-group column scales) and dequantized in
registers into the activations' dtype before `tl.dot`, accumulating in fp32: the weights cross HBM at 8
or 4 bits, the activations stay bf16 (or fp16 / fp32). Codes are decoded with integer arithmetic (e4m3,
e2m1, int4 - 8), which runs the same on GPUs and under TRITON_INTERPRET=1.

Tiles per format (`QUANT_TILES`): BLOCK_K within one scale group is not required (each element looks its
scale up), but 4-bit codes pair columns j and j + 8 of a panel in one byte, so BLOCK_N is a multiple of 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.align_kernel import moe_align_block_size_triton
from engine.kernels.configs import GemmConfig
from engine.quant.packed import QWeight

# format -> (BLOCK_M, gate/up tile, down tile) by decode (<= 64 pairs) and prefill; fewer stages for the
# 4-bit formats, whose tiles are half the bytes.
QUANT_TILES: dict[str, dict[str, tuple[int, GemmConfig, GemmConfig]]] = {
    "fp8": {
        "decode": (16, GemmConfig(64, 128, 1, 4, 3), GemmConfig(64, 128, 1, 4, 3)),
        "prefill": (64, GemmConfig(128, 64, 8, 8, 3), GemmConfig(128, 64, 8, 8, 3)),
    },
    "int4": {
        "decode": (16, GemmConfig(64, 128, 1, 4, 2), GemmConfig(64, 128, 1, 4, 2)),
        "prefill": (64, GemmConfig(128, 64, 8, 8, 2), GemmConfig(128, 64, 8, 8, 2)),
    },
    "nvfp4": {
        "decode": (16, GemmConfig(64, 128, 1, 4, 2), GemmConfig(64, 128, 1, 4, 2)),
        "prefill": (64, GemmConfig(128, 64, 8, 8, 2), GemmConfig(128, 64, 8, 8, 2)),
    },
}
_FMT = {"fp8": 0, "int4": 1, "nvfp4": 2}


@triton.jit
def _e4m3(b):
    """uint8 codes (as int32) -> fp32 (NaN codes are never written)."""
    mag = b & 0x7F
    normal = ((mag << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    sub = mag.to(tl.float32) * (1.0 / 512.0)
    f = tl.where(mag < 8, sub, normal)
    return tl.where((b & 0x80) != 0, -f, f)


@triton.jit
def _dequant_tile(
    codes_ptr, scales_ptr, s2_ptr, expert, offs_k, offs_n, k_ok, n_ok, K, P, NP, group, FMT: tl.constexpr
):
    """The [BLOCK_K, BLOCK_N] weight tile (k rows, n output columns) of one expert, dequantized to fp32."""
    panel = (offs_n // 16).to(tl.int64)
    lane = offs_n % 16
    row = (expert * P + panel[None, :]) * K + offs_k[:, None].to(tl.int64)
    mask = k_ok[:, None] & n_ok[None, :]
    if FMT == 0:
        b = tl.load(codes_ptr + row * 16 + lane[None, :], mask=mask, other=0).to(tl.int32)
        v = _e4m3(b)
    else:
        byte = tl.load(codes_ptr + row * 8 + (lane % 8)[None, :], mask=mask, other=0).to(tl.int32)
        nib = (byte >> ((lane // 8) * 4)[None, :]) & 15
        if FMT == 1:
            v = (nib - 8).to(tl.float32)
        else:
            mag = nib & 7
            e = mag >> 1
            m = (mag & 1).to(tl.float32)
            v = tl.where(e == 0, m * 0.5, tl.exp2((e - 1).to(tl.float32)) * (1.0 + 0.5 * m))
            v = tl.where((nib & 8) != 0, -v, v)
    s_off = (expert * ((K + group - 1) // group) + (offs_k // group)[:, None].to(tl.int64)) * NP + offs_n[
        None, :
    ]
    if FMT == 2:
        s = _e4m3(tl.load(scales_ptr + s_off, mask=mask, other=0).to(tl.int32))
        s = s * tl.load(s2_ptr + expert * NP + offs_n, mask=n_ok, other=0.0)[None, :]
    else:
        s = tl.load(scales_ptr + s_off, mask=mask, other=0.0)
    return v * s


@triton.jit
def _qgemm_kernel(
    a_ptr,
    codes_ptr,
    scales_ptr,
    s2_ptr,
    c_ptr,
    weight_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_post_ptr,
    N,
    K,
    P,
    NP,
    group,
    up_offset,  # gate/up: the up columns start here in the fused [2I, H] weight
    num_pairs,
    num_blocks_m,
    limit,
    stride_am,
    stride_ak,
    stride_cm,
    stride_cn,
    FMT: tl.constexpr,
    A_ROW_DIV: tl.constexpr,
    GATED: tl.constexpr,
    CLAMP: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_blocks_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_blocks_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    valid = pair < num_pairs
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    row = (pair // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = kb * BLOCK_K + offs_k0
        k_ok = offs_k < K
        a = tl.load(
            a_ptr + row[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=valid[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = _dequant_tile(
            codes_ptr, scales_ptr, s2_ptr, expert, offs_k, offs_n, k_ok, n_ok, K, P, NP, group, FMT
        )
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
        if GATED:
            b2 = _dequant_tile(
                codes_ptr,
                scales_ptr,
                s2_ptr,
                expert,
                offs_k,
                offs_n + up_offset,
                k_ok,
                n_ok,
                K,
                P,
                NP,
                group,
                FMT,
            )
            acc2 = tl.dot(a, b2.to(a.dtype), acc2, input_precision=PRECISION)
    if GATED:
        gate = acc * tl.sigmoid(acc)
        up = acc2
        if CLAMP:
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        acc = gate * up
    if MUL_WEIGHT:
        w = tl.load(weight_ptr + pair, mask=valid, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(src_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(src_ptr + (t * TOP_K + j) * H + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _launch(a, q: QWeight, n, up_offset, c, weights, align, a_row_div, limit, gated, cfg: GemmConfig):
    num_blocks_m = align.block_expert.numel()
    grid = (num_blocks_m * triton.cdiv(n, cfg.BLOCK_N),)
    s2 = q.scale_2 if q.scale_2.numel() else q.scales
    _qgemm_kernel[grid](
        a,
        q.codes,
        q.scales,
        s2,
        c,
        c if weights is None else weights,
        align.sorted_ids,
        align.block_expert,
        align.num_tokens_post_padded,
        n,
        q.in_features,
        q.codes.shape[1],
        q.codes.shape[1] * 16,
        q.group,
        up_offset,
        c.shape[0],
        num_blocks_m,
        float(limit),
        a.stride(0),
        a.stride(1),
        c.stride(0),
        c.stride(1),
        FMT=_FMT[q.fmt],
        A_ROW_DIV=a_row_div,
        GATED=gated,
        CLAMP=gated and limit > 0,
        MUL_WEIGHT=weights is not None,
        BLOCK_M=align.block_m,
        BLOCK_N=cfg.BLOCK_N,
        BLOCK_K=cfg.BLOCK_K,
        GROUP_M=cfg.GROUP_M,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def fused_moe_quantized(
    x: torch.Tensor,
    gate_up: QWeight,
    down: QWeight,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    swiglu_limit: float = 0.0,
    tiles: tuple[int, GemmConfig, GemmConfig] | None = None,
) -> torch.Tensor:
    """Routed experts with quantized weights: x [T, H] (bf16 / fp16 / fp32), gate_up a QWeight [E, 2I, H]
    (gate columns first), down [E, H, I], topk_weights [T, k] (fp32, scaled), topk_ids [T, k] -> [T, H]."""
    T, H = x.shape
    inter = gate_up.out_features // 2
    if (
        gate_up.fmt != down.fmt
        or gate_up.in_features != H
        or down.out_features != H
        or down.in_features != inter
    ):
        raise ValueError(
            f"fused_moe_quantized: x [{T}, {H}], gate_up {gate_up.fmt} [{gate_up.out_features}, "
            f"{gate_up.in_features}], down {down.fmt} [{down.out_features}, {down.in_features}] do not match"
        )
    if T == 0:
        return torch.zeros_like(x)
    top_k = topk_ids.shape[1]
    block_m, cfg_gu, cfg_dn = tiles or QUANT_TILES[gate_up.fmt]["decode" if T * top_k <= 64 else "prefill"]
    align = moe_align_block_size_triton(topk_ids, gate_up.experts, block_m)
    pairs = T * top_k
    h = x.new_empty(pairs, inter)
    _launch(x.contiguous(), gate_up, inter, inter, h, None, align, top_k, swiglu_limit, True, cfg_gu)
    y = x.new_empty(pairs, H)
    weights = topk_weights.to(torch.float32).contiguous().reshape(-1)
    _launch(h, down, H, 0, y, weights, align, 1, 0.0, False, cfg_dn)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    block_h = min(1024, triton.next_power_of_2(H))
    _combine_kernel[(T, triton.cdiv(H, block_h))](y, out, H, TOP_K=top_k, BLOCK_H=block_h)
    return out
