"""The device-side pieces both fused-MoE GEMM kernels share (`fused_moe._grouped_gemm_kernel` on plain
weights, `fused_moe_quant._qgemm_kernel` on quantized ones): where a program sits in the grouped launch,
which expert-sorted pairs its M block holds, and the epilogue (clamped SwiGLU, routing weight, store).
Only @triton.jit helpers live here, no kernel that is launched: the sm_90 compile test swaps every
JITFunction in `fused_moe`'s namespace for a launch recorder, so `fused_moe` reaches these through the
module (`blocks.store_block`), and they stay real functions for the kernels that call them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_position(num_blocks_m, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program. Grouped launch order: GROUP_M consecutive M blocks share each N
    slice, so a weight tile read by one block is still in L2 for the next (only matters when an expert has
    several blocks: prefill)."""
    pid = tl.program_id(0)
    num_blocks_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_blocks_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_blocks_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_size, (pid % in_group) // group_size


@triton.jit
def block_pairs(sorted_ids_ptr, block_expert_ptr, pid_m, num_pairs, A_ROW_DIV, BLOCK_M: tl.constexpr):
    """The M block's pairs (padding slots hold num_pairs), which are real, their expert (one per block)
    and the row of A each reads (pair // A_ROW_DIV: the token for x, the pair for the pair rows)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    valid = pair < num_pairs
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    return pair, valid, expert, (pair // A_ROW_DIV).to(tl.int64)


@triton.jit
def store_block(
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
    GATED: tl.constexpr,
    CLAMP: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
):
    """Write the block's fp32 accumulators (acc2: up's, when GATED) to the pair rows of c."""
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
