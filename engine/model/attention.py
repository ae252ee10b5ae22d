"""Step attention: GQA, per-head zero-centred q/k RMSNorm, partial NeoX RoPE, head-wise sigmoid gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from advisor.engine.model import cpu_decode
from advisor.engine.model.cache import KVCache, TypeMeta
from advisor.engine.model.layers import Linear, RMSNorm, Rope, Spec, apply_rope
from torch import nn


def _store(buf: torch.Tensor, meta: TypeMeta, new: torch.Tensor) -> None:
    """Write this step's keys or values [B, Hkv, T, D] into the cache buffer's slots."""
    if isinstance(meta.write, tuple):  # ragged rows: each row's own slots
        rows, slots = meta.write
        buf.transpose(1, 2)[rows, slots] = new.transpose(1, 2)
    else:
        buf[:, :, meta.write] = new[:, :, meta.write_from :]


class Attention(nn.Module):
    def __init__(
        self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float, scale: float
    ):
        super().__init__()
        self.h, self.hkv, self.d = num_heads, num_kv_heads, head_dim
        self.hidden = hidden
        self.scale = scale
        # q, k, v and the gate g share one matmul; split sizes in this order.
        self.sizes = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim, num_heads)
        self.qkvg = Linear(sum(self.sizes), hidden)
        self.o = Linear(hidden, num_heads * head_dim)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def checkpoint_spec(self, prefix: str) -> Spec:
        hd = self.hidden
        names = ("q_proj", "k_proj", "v_proj", "g_proj")
        return {
            "qkvg.weight": (
                [(f"{prefix}.{n}.weight", (s, hd)) for n, s in zip(names, self.sizes, strict=True)],
                0,
            ),
            "o.weight": ([(f"{prefix}.o_proj.weight", (hd, self.h * self.d))], 0),
            "q_norm.weight": ([(f"{prefix}.q_norm.weight", (self.d,))], 0),
            "k_norm.weight": ([(f"{prefix}.k_norm.weight", (self.d,))], 0),
        }

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        meta: TypeMeta,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if cache is not None and meta.slot is not None:
            ops = cpu_decode.ops()
            ck, cv = cache.k[layer], cache.v[layer]
            if ops is not None and cpu_decode.usable(x, ck) and ck.is_contiguous() and cv.is_contiguous():
                return self._decode_cpu(ops, x, rope, meta, ck, cv)
        fused = getattr(meta, "fused", None)  # a paged cache (advisor.engine.serving): its compiled CPU op
        if fused is not None and B == 1:
            qkvg = self.qkvg(x)
            out = fused(cpu_decode.ops(), qkvg[0], self, rope, layer)
            if out is not None:
                return self.o(out.view(B, T, -1))
            q, k, v, g = qkvg.split(self.sizes, dim=-1)
        else:
            q, k, v, g = self.qkvg(x).split(self.sizes, dim=-1)
        q = self.q_norm(q.view(B, T, self.h, self.d))
        k = self.k_norm(k.view(B, T, self.hkv, self.d))
        v = v.view(B, T, self.hkv, self.d)
        cos, sin = rope.cos_sin
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attend = getattr(meta, "attend", None)
        if attend is not None:  # a paged cache (advisor.engine.serving): the step's metadata holds the block tables
            out = attend(q, k, v, layer, self.scale) * torch.sigmoid(g)[..., None]
            return self.o(out.reshape(B, T, self.h * self.d))
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, T, D]

        if cache is not None:
            ck, cv = cache.k[layer], cache.v[layer]
            if meta.attend_cache:
                _store(ck, meta, k)
                _store(cv, meta, v)
                k, v = ck[:, :, meta.read], cv[:, :, meta.read]
            else:
                old_k, old_v = ck[:, :, meta.read], cv[:, :, meta.read]
                new_k, new_v = k, v
                k, v = torch.cat([old_k, new_k], dim=2), torch.cat([old_v, new_v], dim=2)
                _store(ck, meta, new_k)
                _store(cv, meta, new_v)

        # GQA without repeating K/V: fold each KV head's query group into the query-length axis.
        G = self.h // self.hkv
        qg = q.view(B, T, self.hkv, G, self.d).permute(0, 2, 3, 1, 4).reshape(B, self.hkv, G * T, self.d)
        S = k.shape[2]
        mask = meta.mask.expand(B, G, T, S).reshape(B, 1, G * T, S) if G > 1 else meta.mask
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=self.scale)
        out = out.view(B, self.hkv, G, T, self.d).permute(0, 3, 1, 2, 4).reshape(B, T, self.h, self.d)
        out = out * torch.sigmoid(g)[..., None]
        return self.o(out.reshape(B, T, self.h * self.d))

    def _decode_cpu(
        self, ops, x, rope: Rope, meta: TypeMeta, ck: torch.Tensor, cv: torch.Tensor
    ) -> torch.Tensor:
        """One new token per row through the compiled op: the same maths as `forward`, one call."""
        B = x.shape[0]
        cos, sin = rope.cos_sin  # built once per step for all the layers of this attention type
        out = ops.decode_attention(
            self.qkvg(x).reshape(B, -1),
            self.q_norm.scale(),
            self.k_norm.scale(),
            cos.reshape(B, -1),
            sin.reshape(B, -1),
            rope.positions.reshape(B).contiguous(),
            ck,
            cv,
            meta.slot,
            meta.kpos,
            meta.window or 0,
            self.h,
            self.q_norm.eps,
            self.scale,
        )
        return self.o(out.view(B, 1, -1))
