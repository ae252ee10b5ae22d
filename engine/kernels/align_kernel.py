"""The alignment of `align.moe_align_block_size` as ONE Triton launch (the PyTorch version is about ten
small kernels, which at decode costs about as long as streaming the experts' weights).

A single program walks the pairs in chunks, so the result is exactly the PyTorch version's (pairs in
token order within each expert): histogram -> padded offsets (cumsum) -> sentinel fill -> per-chunk ranks
(a CHUNK x CHUNK comparison) added to each expert's running offset, kept in a small scratch buffer so the
chunk can gather it by expert id -> block experts. Barriers order the phases' global writes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from advisor.engine.kernels.align import Alignment, max_padded_len


@triton.jit
def _align_kernel(
    ids_ptr,
    sorted_ptr,
    block_expert_ptr,
    num_post_ptr,
    running_ptr,
    n,
    num_experts,
    length,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,  # power of two > num_experts: bin E_PAD - 1 collects the masked lanes
    CHUNK: tl.constexpr,
    FILL: tl.constexpr,
):
    lanes = tl.arange(0, CHUNK)
    bins = tl.arange(0, E_PAD)
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for start in range(0, n, CHUNK):
        e = tl.load(ids_ptr + start + lanes, mask=start + lanes < n, other=E_PAD - 1).to(tl.int32)
        counts += tl.histogram(e, E_PAD)
    counts = tl.where(bins < num_experts, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    cum = tl.cumsum(padded, 0)
    tl.store(num_post_ptr, tl.sum(padded, 0))
    tl.store(running_ptr + bins, cum - padded)

    for start in range(0, length, FILL):
        offs = start + tl.arange(0, FILL)
        tl.store(sorted_ptr + offs, tl.zeros((FILL,), dtype=tl.int32) + n, mask=offs < length)
    tl.debug_barrier()

    earlier = lanes[None, :] < lanes[:, None]  # [i, j]: j comes before i
    for start in range(0, n, CHUNK):
        ok = start + lanes < n
        e = tl.load(ids_ptr + start + lanes, mask=ok, other=E_PAD - 1).to(tl.int32)
        rank = tl.sum((e[None, :] == e[:, None]) & earlier, axis=1)
        base = tl.load(running_ptr + e, mask=ok, other=0)
        tl.store(sorted_ptr + base + rank, start + lanes, mask=ok)
        tl.debug_barrier()  # every lane has read `running` before it moves on
        running = tl.load(running_ptr + bins) + tl.histogram(e, E_PAD)
        tl.debug_barrier()
        tl.store(running_ptr + bins, running)
        tl.debug_barrier()

    # Block b belongs to the first expert whose padded run ends after b * BLOCK_M; blocks past the end
    # (never computed) name the last expert so any stray read stays in bounds.
    for start in range(0, length // BLOCK_M, CHUNK):
        blk = start + lanes
        ended = (cum[None, :] <= blk[:, None] * BLOCK_M) & (bins[None, :] < num_experts)
        expert = tl.minimum(tl.sum(ended.to(tl.int32), axis=1), num_experts - 1)
        tl.store(block_expert_ptr + blk, expert, mask=blk < length // BLOCK_M)


def moe_align_block_size_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Same contract and result as `align.moe_align_block_size`, in one launch."""
    if topk_ids.dim() != 2:
        raise ValueError(f"moe_align_block_size: topk_ids must be [T, k], got shape {tuple(topk_ids.shape)}")
    if block_m < 1:
        raise ValueError(f"moe_align_block_size: block_m must be positive, got {block_m}")
    dev = topk_ids.device
    n = topk_ids.numel()
    length = max_padded_len(n, num_experts, block_m)
    e_pad = triton.next_power_of_2(num_experts + 1)
    sorted_ids = torch.empty(length, dtype=torch.int32, device=dev)
    block_expert = torch.empty(length // block_m, dtype=torch.int32, device=dev)
    num_post = torch.empty(1, dtype=torch.int32, device=dev)
    running = torch.empty(e_pad, dtype=torch.int32, device=dev)
    _align_kernel[(1,)](
        topk_ids.contiguous(),
        sorted_ids,
        block_expert,
        num_post,
        running,
        n,
        num_experts,
        length,
        BLOCK_M=block_m,
        E_PAD=e_pad,
        CHUNK=64,
        FILL=1024,
        num_warps=8 if e_pad >= 256 else 4,
    )
    return Alignment(sorted_ids, block_expert, num_post, block_m)
