"""Token-to-expert sort and block alignment for the grouped GEMMs.

The T*k (token, slot) pairs are numbered p = t * k + j. They are sorted by expert and each expert's run is
padded to a multiple of BLOCK_M with the sentinel T*k, so every BLOCK_M-row block of the sorted list belongs
to one expert. Everything stays on the device with no host synchronisation (CUDA-graph friendly): the
output is sized by an upper bound and the kernels stop at `num_tokens_post_padded`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Alignment:
    sorted_ids: torch.Tensor  # int32 [max_padded]: pair ids, grouped by expert, sentinel T*k in the padding
    block_expert: torch.Tensor  # int32 [max_padded // BLOCK_M]: the expert of each block
    num_tokens_post_padded: torch.Tensor  # int32 [1]: used length of sorted_ids (a multiple of BLOCK_M)
    block_m: int


def max_padded_len(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the padded length: at most min(pairs, experts) experts get a partial block."""
    bound = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return -(-bound // block_m) * block_m


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """topk_ids [T, k] (any integer dtype) -> Alignment. Experts with no tokens get no blocks; blocks past
    `num_tokens_post_padded` hold only sentinels and name expert E-1 (in bounds, never computed)."""
    if topk_ids.dim() != 2:
        raise ValueError(f"moe_align_block_size: topk_ids must be [T, k], got shape {tuple(topk_ids.shape)}")
    if block_m < 1:
        raise ValueError(f"moe_align_block_size: block_m must be positive, got {block_m}")
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    n = flat.numel()
    # scatter_add rather than bincount: CUDA's bincount reads the max back to the host (a sync).
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    padded = (counts + block_m - 1) // block_m * block_m
    cum_padded = torch.cumsum(padded, 0)
    pad_starts = cum_padded - padded
    starts = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)  # stable: within an expert, pairs stay in token order
    sorted_e = flat[order]
    rank = torch.arange(n, device=dev) - starts[sorted_e]
    length = max_padded_len(n, num_experts, block_m)
    sorted_ids = torch.full((length,), n, dtype=torch.int32, device=dev)
    sorted_ids[pad_starts[sorted_e] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, length, block_m, device=dev)
    block_expert = torch.searchsorted(cum_padded, block_starts, right=True).clamp_(max=num_experts - 1)
    return Alignment(
        sorted_ids=sorted_ids,
        block_expert=block_expert.to(torch.int32),
        num_tokens_post_padded=cum_padded[-1:].to(torch.int32),
        block_m=block_m,
    )
