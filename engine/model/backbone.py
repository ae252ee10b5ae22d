"""The Step 3.7 Flash text backbone (plus MTP layers, loaded and kept for speculative decoding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from advisor.engine.model.attention import Attention
from advisor.engine.model.cache import KVCache, StepMeta
from advisor.engine.model.config import LayerSpec, TextConfig
from advisor.engine.model.layers import MLP, Linear, RMSNorm, Spec, rope_inv_freq, rope_tables
from advisor.engine.model.moe import MoE, fused_moe_kernel
from torch import nn


def _prefixed(prefix: str, spec: Spec) -> Spec:
    return {f"{prefix}.{k}": v for k, v in spec.items()}


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        self.attention_type = spec.attention
        h = cfg.hidden_size
        self.input_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attn_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.attn = Attention(
            h,
            spec.num_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.rms_norm_eps,
            cfg.query_pre_attn_scalar**-0.5,
        )
        self.mlp: nn.Module
        if spec.mlp == "sparse":
            self.mlp = MoE(
                h,
                cfg.moe_intermediate_size,
                cfg.n_routed_experts,
                cfg.num_experts_per_tok,
                cfg.share_expert_dim,
                cfg.moe_router_scaling_factor,
                spec.swiglu_limit,
                spec.swiglu_limit_shared,
            )
        else:
            self.mlp = MLP(h, cfg.intermediate_size, spec.swiglu_limit_shared)

    def checkpoint_spec(self, prefix: str) -> Spec:
        h = self.input_norm.weight.shape[0]
        spec: Spec = {
            "input_norm.weight": ([(f"{prefix}.input_layernorm.weight", (h,))], 0),
            "post_attn_norm.weight": ([(f"{prefix}.post_attention_layernorm.weight", (h,))], 0),
        }
        spec.update(_prefixed("attn", self.attn.checkpoint_spec(f"{prefix}.self_attn")))
        mlp_prefix = prefix if isinstance(self.mlp, MoE) else f"{prefix}.mlp"
        spec.update(_prefixed("mlp", self.mlp.checkpoint_spec(mlp_prefix)))
        return spec

    def forward(self, x, rope, meta, cache, index):
        x, out = self.step(x, None, rope, meta, cache, index)
        return x + out

    def step(self, x, pending, rope, meta, cache, index):
        """The layer with its last residual add left to the caller: returns (stream, MLP output). `pending`
        is the previous layer's MLP output, not yet added to x: its add goes into this layer's first norm
        (one pass where the CPU ops run, one op fewer per layer at decode)."""
        if pending is None:
            h = self.input_norm(x)
        else:
            x, h = self.input_norm.add(pending, x)
        x, h = self.post_attn_norm.add(x, self.attn(h, rope, meta, cache, index))
        return x, self.mlp(h)


class MTPLayer(nn.Module):
    """One multi-token-prediction layer: h = eh_proj([enorm(embed(tok)), hnorm(h_prev)]) -> block -> head.

    Speculative decoding runs it (`advisor.engine.model.mtp`); plain generation does not.
    """

    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = nn.Parameter(torch.empty(h, 2 * h), requires_grad=False)
        self.block = DecoderLayer(cfg, spec)
        self.head_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.head = nn.Parameter(torch.empty(cfg.vocab_size, h), requires_grad=False)

    def checkpoint_spec(self, prefix: str) -> Spec:
        h, v = self.eh_proj.shape[0], self.head.shape[0]
        spec: Spec = {
            "enorm.weight": ([(f"{prefix}.enorm.weight", (h,))], 0),
            "hnorm.weight": ([(f"{prefix}.hnorm.weight", (h,))], 0),
            "eh_proj": ([(f"{prefix}.eh_proj.weight", (h, 2 * h))], 0),
            "head_norm.weight": ([(f"{prefix}.transformer.shared_head.norm.weight", (h,))], 0),
            "head": ([(f"{prefix}.transformer.shared_head.output.weight", (v, h))], 0),
        }
        spec.update(_prefixed("block", self.block.checkpoint_spec(prefix)))
        return spec


class StepTextModel(nn.Module):
    def __init__(self, cfg: TextConfig, with_mtp: bool = False):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, s) for s in cfg.layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.vocab_size, cfg.hidden_size)
        self.mtp = nn.ModuleList(MTPLayer(cfg, s) for s in cfg.mtp_layers) if with_mtp else nn.ModuleList()
        self.inv_freq: dict[str, torch.Tensor] = {}

    def checkpoint_spec(self) -> Spec:
        c = self.cfg
        spec: Spec = {
            "embed": ([("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))], 0),
            "norm.weight": ([("model.norm.weight", (c.hidden_size,))], 0),
            "lm_head.weight": ([("lm_head.weight", (c.vocab_size, c.hidden_size))], 0),
        }
        for i, layer in enumerate(self.layers):
            spec.update(_prefixed(f"layers.{i}", layer.checkpoint_spec(f"model.layers.{i}")))
        for j, mtp in enumerate(self.mtp):
            spec.update(_prefixed(f"mtp.{j}", mtp.checkpoint_spec(f"model.layers.{c.num_hidden_layers + j}")))
        return spec

    def finalize(self, device: torch.device) -> None:
        """After loading: RoPE tables, and the weight layouts this device's kernels read fastest."""
        self.inv_freq = {t: rope_inv_freq(s, self.cfg.head_dim).to(device) for t, s in self.cfg.rope.items()}
        use_kernel = device.type == "cuda" and fused_moe_kernel() is not None
        for m in self.modules():
            if isinstance(m, MoE):
                m.prepare(use_kernel)
            elif isinstance(m, Linear) and device.type == "cpu":
                m.relayout()

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed)

    def forward(
        self,
        embeds: torch.Tensor,
        meta: StepMeta,
        cache: KVCache | None = None,
        last_only: bool = False,
        select: torch.Tensor | None = None,
        hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """embeds [B, T, H] -> logits [B, T, vocab] (or [B, 1, vocab] with last_only, [B, len(select), vocab]
        for the positions in `select`), in the model dtype. With `hidden`: (those logits, the last layer's
        output stream [B, T, H] before the final norm, all positions), the hidden state the MTP layers
        draft from."""
        x, pending = embeds, None
        ropes = rope_tables(self.inv_freq, meta.positions, x.dtype)
        for i, layer in enumerate(self.layers):
            t = layer.attention_type
            x, pending = layer.step(x, pending, ropes[t], meta.types[t], cache, i)
        if pending is None:  # no layers
            pending = torch.zeros_like(x)
        if hidden:
            stream, normed = self.norm.add(pending, x)
            if last_only:
                normed = normed[:, -1:]
            elif select is not None:
                normed = normed[:, select]
            return self.lm_head(normed), stream
        if last_only:
            x, pending = x[:, -1:], pending[:, -1:]
        elif select is not None:
            x, pending = x[:, select], pending[:, select]
        return self.lm_head(self.norm.add(pending, x)[1])
