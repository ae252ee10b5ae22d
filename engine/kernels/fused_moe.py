"""Fused MoE for the routed experts, in Triton.

    out[t] = sum_j  w[t, j] * down_e( act(gate_e x_t, up_e x_t) ),  e = ids[t, j]
    act(g, u) = min(silu(g), L) * clamp(u, -L, L)   when L > 0, else silu(g) * u

Four launches: the alignment (`align_kernel`, same result as `align.moe_align_block_size`), then
1. gate/up grouped GEMM: each program takes one BLOCK_M block of the expert-sorted pairs (all one expert)
   and one BLOCK_N slice of the intermediate dimension, accumulates x @ gate_e^T and x @ up_e^T in fp32 and
   writes act(...) for those pairs in the activation dtype (the reference rounds there too);
2. down grouped GEMM on those rows, times the pair's routing weight (fp32), written per pair;
3. the combine: each token sums its k pair rows in fp32.
The router and the shared expert stay in PyTorch (engine/model/moe.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.align_kernel import moe_align_block_size_triton
from engine.kernels.configs import GemmConfig, MoEConfig, dtype_name, get_config
from engine.kernels.reference import check_moe_args


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    b2_ptr,
    c_ptr,
    weight_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_post_ptr,
    N,
    K,
    num_pairs,
    num_blocks_m,
    limit,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    A_ROW_DIV: tl.constexpr,  # pair -> row of A: top_k for x (pair // k = token), 1 for the pair rows
    GATED: tl.constexpr,  # b is gate, b2 is up, and the clamped SwiGLU is the epilogue
    CLAMP: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (tl.dot would otherwise round them to tf32 on GPUs)
):
    # Grouped launch order: GROUP_M consecutive M blocks share each N slice, so a weight tile read by one
    # block is still in L2 for the next (only matters when an expert has several blocks: prefill).
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
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_off = expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    b_ptrs = b_ptr + b_off
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        b2_ptrs = b2_ptr + b_off
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if GATED:
            b2 = tl.load(b2_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=PRECISION)
            b2_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if GATED:
        gate = acc * tl.sigmoid(acc)  # silu
        up = acc2
        if CLAMP:
            # Step's order: clamp after the activation on gate (max only), symmetric on up.
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
    """out[t] = sum_j src[t * TOP_K + j] (the routing weights are already in src), summed in fp32."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(src_ptr + (t * TOP_K + j) * H + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _launch_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    b2: torch.Tensor | None,
    c: torch.Tensor,
    weights: torch.Tensor | None,
    align,
    a_row_div: int,
    limit: float,
    cfg: GemmConfig,
) -> None:
    n, k = b.shape[1], b.shape[2]
    num_blocks_m = align.block_expert.numel()
    grid = (num_blocks_m * triton.cdiv(n, cfg.BLOCK_N),)
    _grouped_gemm_kernel[grid](
        a,
        b,
        b if b2 is None else b2,
        c,
        c if weights is None else weights,
        align.sorted_ids,
        align.block_expert,
        align.num_tokens_post_padded,
        n,
        k,
        c.shape[0],
        num_blocks_m,
        float(limit),
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        c.stride(0),
        c.stride(1),
        A_ROW_DIV=a_row_div,
        GATED=b2 is not None,
        CLAMP=b2 is not None and limit > 0,
        MUL_WEIGHT=weights is not None,
        BLOCK_M=align.block_m,
        BLOCK_N=cfg.BLOCK_N,
        BLOCK_K=cfg.BLOCK_K,
        GROUP_M=cfg.GROUP_M,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _check(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> None:
    dtype_name(x.dtype)  # a dtype the kernel has tiles for
    check_moe_args(x, w_gate, w_up, w_down, topk_weights, topk_ids, where="fused_moe")


def fused_moe(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor | None,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    swiglu_limit: float = 0.0,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """Routed experts: x [T, H], w_gate and w_up [E, I, H] (or w_gate = the packed gate_up [E, 2I, H] and
    w_up = None), w_down [E, H, I], topk_weights [T, k] (fp32, already scaled), topk_ids [T, k] -> [T, H]
    in x's dtype. swiglu_limit <= 0 means no clamp. `config` overrides the tile table (tuning, tests)."""
    if w_up is None:
        inter = w_gate.shape[1] // 2
        w_gate, w_up = w_gate[:, :inter], w_gate[:, inter:]  # views: the kernel reads through strides
    _check(x, w_gate, w_up, w_down, topk_weights, topk_ids)
    T, H = x.shape
    E, inter = w_gate.shape[0], w_gate.shape[1]
    top_k = topk_ids.shape[1]
    if T == 0:
        return torch.zeros_like(x)
    cfg = config or get_config(T, E, top_k, inter, H, x.dtype)
    align = moe_align_block_size_triton(topk_ids, E, cfg.BLOCK_M)
    pairs = T * top_k
    h = x.new_empty(pairs, inter)
    _launch_gemm(x, w_gate, w_up, h, None, align, top_k, swiglu_limit, cfg.gate_up)
    y = x.new_empty(pairs, H)
    weights = topk_weights.to(torch.float32).contiguous().reshape(-1)
    _launch_gemm(h, w_down, None, y, weights, align, 1, 0.0, cfg.down)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)  # row-major whatever x's strides
    block_h = min(1024, triton.next_power_of_2(H))
    _combine_kernel[(T, triton.cdiv(H, block_h))](y, out, H, TOP_K=top_k, BLOCK_H=block_h)
    return out
