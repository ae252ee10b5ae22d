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

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from advisor.engine.kernels import moe_blocks as blocks  # a module, not its names: see moe_blocks
from advisor.engine.kernels.align_kernel import moe_align_block_size_triton
from advisor.engine.kernels.configs import GemmConfig, MoEConfig, dtype_name, get_config
from advisor.engine.kernels.reference import check_moe_args


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
    pid_m, pid_n = blocks.block_position(num_blocks_m, N, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    pair, valid, expert, row = blocks.block_pairs(
        sorted_ids_ptr, block_expert_ptr, pid_m, num_pairs, A_ROW_DIV, BLOCK_M
    )

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_off = expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    b_ptrs = b_ptr + b_off
    b2_ptrs = b2_ptr + b_off
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # up's (GATED); dead code otherwise
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
    blocks.store_block(
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


def launch_grouped(
    kernel, a: torch.Tensor, c: torch.Tensor, weights, align, n: int, a_row_div: int, limit: float, gated: bool,
    cfg: GemmConfig, **operands,
) -> None:  # fmt: skip
    """One grouped GEMM launch over the aligned pairs: the arguments every such kernel takes (A, C, the
    routing weights, the alignment, N, the epilogue's switches, the tile) by name, plus the kernel's own
    operands (its weights and their strides or scales)."""
    num_blocks_m = align.block_expert.numel()
    grid = (num_blocks_m * triton.cdiv(n, cfg.BLOCK_N),)
    kernel[grid](
        a_ptr=a,
        c_ptr=c,
        weight_ptr=c if weights is None else weights,
        sorted_ids_ptr=align.sorted_ids,
        block_expert_ptr=align.block_expert,
        num_post_ptr=align.num_tokens_post_padded,
        N=n,
        num_pairs=c.shape[0],
        num_blocks_m=num_blocks_m,
        limit=float(limit),
        stride_am=a.stride(0),
        stride_ak=a.stride(1),
        stride_cm=c.stride(0),
        stride_cn=c.stride(1),
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
        **operands,
    )


def run_routed(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    inter: int,
    block_m: int,
    gate_up: Callable[[torch.Tensor, object], None],
    down: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], None],
) -> torch.Tensor:
    """The launches around the two GEMMs, shared by the plain and the quantized fused MoE: the alignment,
    `gate_up(h, align)` writing act(gate, up) per pair, `down(h, y, weights, align)` writing the weighted
    down projection per pair, then the combine (each token's k pair rows summed in fp32) -> [T, H]."""
    T, H = x.shape
    top_k = topk_ids.shape[1]
    align = moe_align_block_size_triton(topk_ids, num_experts, block_m)
    pairs = T * top_k
    h = x.new_empty(pairs, inter)
    gate_up(h, align)
    y = x.new_empty(pairs, H)
    down(h, y, topk_weights.to(torch.float32).contiguous().reshape(-1), align)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)  # row-major whatever x's strides
    block_h = min(1024, triton.next_power_of_2(H))
    _combine_kernel[(T, triton.cdiv(H, block_h))](y, out, H, TOP_K=top_k, BLOCK_H=block_h)
    return out


def _weight_operands(b: torch.Tensor, b2: torch.Tensor | None) -> dict:
    """The plain kernel's weight operands: b (and b2, up's, when gated) [E, N, K] through their strides."""
    return dict(
        b_ptr=b,
        b2_ptr=b if b2 is None else b2,
        K=b.shape[2],
        stride_be=b.stride(0),
        stride_bn=b.stride(1),
        stride_bk=b.stride(2),
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

    def gate_up(h, align):
        launch_grouped(
            _grouped_gemm_kernel, x, h, None, align, inter, top_k, swiglu_limit, True, cfg.gate_up,
            **_weight_operands(w_gate, w_up),
        )  # fmt: skip

    def down(h, y, weights, align):
        launch_grouped(
            _grouped_gemm_kernel,
            h,
            y,
            weights,
            align,
            H,
            1,
            0.0,
            False,
            cfg.down,
            **_weight_operands(w_down, None),
        )

    return run_routed(x, topk_weights, topk_ids, E, inter, cfg.BLOCK_M, gate_up, down)
