"""Fused MoE with quantized expert weights (W8A16 FP8 block scales, W4A16 int4 groups and NVFP4), in Triton.

Same four launches as `fused_moe`, through its `run_routed` and `launch_grouped` (alignment, gate/up grouped GEMM with the clamped SwiGLU, down grouped
GEMM times the routing weight, combine), but the weight tiles are read in the engine's quantized layout
(`advisor.engine.quant.packed.QWeight`: 16-column panels of codes, per-group column scales) and dequantized in
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
from advisor.engine.kernels.configs import GemmConfig
from advisor.engine.kernels.fused_moe import launch_grouped, run_routed
from advisor.engine.kernels.moe_blocks import block_pairs, block_position, store_block
from advisor.engine.quant.packed import QWeight

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
    pid_m, pid_n = block_position(num_blocks_m, N, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    pair, valid, expert, row = block_pairs(
        sorted_ids_ptr, block_expert_ptr, pid_m, num_pairs, A_ROW_DIV, BLOCK_M
    )
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # up's (GATED); dead code otherwise
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
    store_block(
        acc,
        acc2,
        c_ptr,
        weight_ptr,
        pair,
        valid,
        offs_n,
        n_ok,
        limit,
        stride_cm,
        stride_cn,
        GATED,
        CLAMP,
        MUL_WEIGHT,
    )


def _operands(q: QWeight, up_offset: int) -> dict:
    """The quantized kernel's weight operands: the codes, scales and scale_2 of a QWeight, its layout."""
    return dict(
        codes_ptr=q.codes,
        scales_ptr=q.scales,
        s2_ptr=q.scale_2 if q.scale_2.numel() else q.scales,
        K=q.in_features,
        P=q.codes.shape[1],
        NP=q.codes.shape[1] * 16,
        group=q.group,
        up_offset=up_offset,
        FMT=_FMT[q.fmt],
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
    x = x.contiguous()

    def gate_up_gemm(h, align):
        launch_grouped(
            _qgemm_kernel,
            x,
            h,
            None,
            align,
            inter,
            top_k,
            swiglu_limit,
            True,
            cfg_gu,
            **_operands(gate_up, inter),
        )

    def down_gemm(h, y, weights, align):
        launch_grouped(_qgemm_kernel, h, y, weights, align, H, 1, 0.0, False, cfg_dn, **_operands(down, 0))

    return run_routed(x, topk_weights, topk_ids, gate_up.experts, inter, block_m, gate_up_gemm, down_gemm)
