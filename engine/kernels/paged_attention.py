"""Paged-attention decode in Triton: one new query token per sequence over its block table.

One program per (sequence, query head): it walks the sequence's blocks from the first one its window
still sees to the last, reading each block's keys and values by id from the paged storage
([num_blocks * block_size, Hkv, D], `advisor.engine.serving.paged_attention`), with an online softmax (running
max and sum) so nothing of length S is materialised. GQA: query head h reads KV head h // (H / Hkv).
Sliding windows come in as each sequence's first attended position. Products are elementwise sums, not
`tl.dot` (a decode query is one row), so the kernel also runs, exactly, under TRITON_INTERPRET=1 in fp32.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the engine runs without Triton (the PyTorch path)
    triton = None


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr,  # [N, H, D]
        k_ptr,  # [rows, Hkv, D]
        v_ptr,
        table_ptr,  # [N, max_blocks] int32
        start_ptr,  # [N] first key position attended
        len_ptr,  # [N] keys: positions [start, len)
        out_ptr,  # [N, H, D]
        scale,
        stride_qn,
        stride_qh,
        stride_kr,
        stride_kh,
        stride_tn,
        stride_on,
        stride_oh,
        GROUP: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        n = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // GROUP
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        q = tl.load(q_ptr + n * stride_qn + h * stride_qh + d, mask=dmask, other=0.0).to(tl.float32)
        start = tl.load(start_ptr + n)
        length = tl.load(len_ptr + n)
        offs = tl.arange(0, BLOCK_SIZE)
        m_i = tl.full([1], float("-inf"), tl.float32)
        l_i = tl.zeros([1], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for b in range(start // BLOCK_SIZE, tl.cdiv(length, BLOCK_SIZE)):
            block = tl.load(table_ptr + n * stride_tn + b).to(tl.int64)
            pos = b * BLOCK_SIZE + offs
            valid = (pos >= start) & (pos < length)
            rows = block * BLOCK_SIZE + offs
            kv_off = rows[:, None] * stride_kr + kvh * stride_kh + d[None, :]
            kvmask = valid[:, None] & dmask[None, :]
            k = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * scale
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        out = acc / l_i
        tl.store(out_ptr + n * stride_on + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=dmask)


def available() -> bool:
    return triton is not None


def paged_decode_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    block_size: int,
) -> torch.Tensor:
    """`paged_decode` in plain PyTorch, the definition the kernel is checked against (tests, `gpu_check`):
    per sequence, its keys and values gathered through the block table, softmax attention in fp32 for
    every query head (head h reads KV head h // (H / Hkv)) -> [N, H, D] in q's dtype."""
    N, H, D = q.shape
    hkv = k_cache.shape[1]
    out = torch.empty_like(q)
    for n in range(N):
        pos = torch.arange(int(starts[n]), int(lengths[n]), device=q.device)
        rows = block_tables[n].long()[pos // block_size] * block_size + pos % block_size
        k, v = k_cache[rows].float(), v_cache[rows].float()  # [S, Hkv, D]
        qg = q[n].float().view(hkv, H // hkv, D)
        p = torch.softmax(torch.einsum("hgd,shd->hgs", qg, k) * scale, dim=-1)
        out[n] = torch.einsum("hgs,shd->hgd", p, v).reshape(H, D).to(q.dtype)
    return out


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    block_size: int,
) -> torch.Tensor:
    """q [N, H, D], caches [rows, Hkv, D], block_tables [N, max_blocks] (int32; entries outside the
    attended span may be anything), starts / lengths [N] -> [N, H, D]: attention of each sequence's
    one query over positions [start, length)."""
    if triton is None:
        raise RuntimeError("paged_decode needs triton")
    N, H, D = q.shape
    hkv = k_cache.shape[1]
    q = q.contiguous()
    out = torch.empty_like(q)
    _paged_decode_kernel[(N, H)](
        q,
        k_cache,
        v_cache,
        block_tables,
        starts,
        lengths,
        out,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=H // hkv,
        BLOCK_SIZE=block_size,
        HEAD_DIM=D,
        BLOCK_D=triton.next_power_of_2(D),
    )
    return out
