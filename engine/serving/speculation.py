"""MTP speculation inside the serving core: the MTP layers draft over the paged cache, the step verifies.

A speculating sequence in decode (tokens x_0..x_m, the main model's cache holding x_0..x_{m-1}) runs
[x_m, d_1..d_k] in the step's flat batch; `accept` keeps the longest agreeing prefix (greedy) or applies
rejection sampling (`engine.model.speculative`), and the core shortens the sequence's block table to its
accepted tokens. Then `PagedDrafter.draft` runs the MTP layers for every sequence that goes on.

The MTP layers' keys and values live in the same block tables as the main model's (their own tensors,
`PagedKVCache` over the MTP layers; a block id holds a position's entries for every layer): layer j's
entry at position p goes in p's slot (RoPE at p + j, the embedded token's position, as
`engine.model.mtp` defines it). So they are bounded by the pool like the rest, dropped with a preempted
sequence's blocks (recomputed with it), released with the sliding window, and served by the prefix cache
(the block keys of speculating sequences also hash the k tokens the entries read past a block's end).

Each round layer j computes positions [firm_j, m-1] (its firm entries are those at p <= m - j, whose
token x_{p+j} is no draft): the new ones and those built on the last round's drafts, whose slots it
overwrites. Its input there is layer j-1's stream, of this round or carried from an earlier one
(`SpecState.carry`), and for layer 1 the main model's last-layer stream h^0 of the verified positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.layers import rope_tables
from engine.model.mtp import head_logits, mtp_config
from engine.model.sampling import draw
from engine.model.speculative import _dist, accept_greedy, accept_sampled
from engine.serving.paged_attention import ChunkTables, PagedKVCache, paged_meta
from engine.serving.sequence import Sequence


def accept(seq: Sequence, drafts: list[int], logits: torch.Tensor) -> list[int]:
    """The tokens a verify step adds: the accepted drafts, then the model's own (logits [k+1, V] fp32,
    the model's after x_m and after each draft)."""
    spec, p = seq.spec, seq.params
    assert spec is not None
    d = torch.tensor(drafts, dtype=torch.long)[None]
    if p.temperature <= 0:
        n, nxt = accept_greedy(d, logits[None].cpu())
    else:
        target = _dist(logits, p.temperature, p.top_p)[None]
        assert spec.q is not None
        n, nxt = accept_sampled(d, spec.q[None, : len(drafts)], target, seq.generator)
    spec.steps += 1
    spec.accepted += n[0]
    return drafts[: n[0]] + [nxt[0]]


def feed(seq: Sequence, rows: torch.Tensor) -> None:
    """Hand the main model's stream h^0 [r, H] at the sequence's next r positions to its MTP layer 1."""
    spec = seq.spec
    assert spec is not None
    c = spec.carry[1]
    spec.carry[1] = rows.clone() if c is None else torch.cat([c, rows])
    spec.firm[0] += rows.shape[0]


class PagedDrafter:
    """The MTP layers over the paged cache, for every speculating sequence of a core."""

    def __init__(self, llm, main: PagedKVCache):
        self.model = model = llm.model
        self.device = llm.device
        cfg = mtp_config(model, len(model.mtp))
        missing = set(cfg.layer_types) - set(main.windows())
        if missing:  # a block table per attention type: the MTP layers need the main model's types
            raise ValueError(f"MTP layers of attention types {sorted(missing)} the main model lacks")
        self.cache = PagedKVCache(cfg, main.num_blocks, main.block_size, llm.dtype, llm.device)

    @torch.inference_mode()
    def draft(self, seqs: list[Sequence], max_model_len: int | None = None) -> None:
        """Draft each sequence's next tokens (into `seq.spec.drafts`, and `spec.q` when sampling): at most
        its k, and no more than it may still generate. Each is in decode: x_m sampled, h^0 fed to m."""
        todo = []
        for s in seqs:
            spec = s.spec
            assert spec is not None and spec.firm[0] == s.num_computed == s.num_tokens - 1, (
                spec and spec.firm,
                s.num_computed,
                s.num_tokens,
            )
            cap = min(spec.k, s.params.max_tokens - len(s.output) - 1)
            if max_model_len is not None:
                cap = min(cap, max_model_len - s.num_tokens - 1)
            spec.drafts, spec.q = [], None
            if cap > 0:
                todo.append((s, cap))
        if not todo:
            return
        model = self.model
        H = model.cfg.hidden_size
        prev: dict[int, torch.Tensor] = {}  # layer j-1's stream this round, per sequence
        new_firm: dict[int, list[int]] = {s.id: [s.num_computed] for s, _ in todo}
        qs: dict[int, list[torch.Tensor]] = {s.id: [] for s, _ in todo}
        for j in range(1, max(c for _, c in todo) + 1):
            group = [s for s, c in todo if c >= j]
            inputs, tokens, chunks = [], [], []
            for s in group:
                spec = s.spec
                m, lo = s.num_computed, spec.firm[j]
                parts = [t for t in (spec.carry[j], prev.get(s.id)) if t is not None and t.shape[0]]
                h = torch.cat(parts) if len(parts) > 1 else parts[0]
                assert h.shape[0] == m - lo, (j, h.shape, m, lo)
                ext = s.tokens + spec.drafts[: j - 1]
                inputs.append(h)
                tokens.extend(ext[lo + j : m + j])
                chunks.append(ChunkTables(lo, m - lo, s.tables))
            meta = paged_meta(self.cache, chunks, self.device)
            layer = model.mtp[j - 1]
            ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[None]
            hid = torch.cat(inputs)[None].to(self.device)
            e = layer.enorm(model.embed_tokens(ids))
            x = F.linear(torch.cat([e, layer.hnorm(hid)], dim=-1), layer.eh_proj)
            t = layer.block.attention_type
            rope = rope_tables(model.inv_freq, meta.positions + j, x.dtype)[t]
            stream = layer.block(x, rope, meta.types[t], None, j - 1)[0]  # [T, H]
            ends = torch.tensor([c.n for c in chunks]).cumsum(0) - 1
            logits = head_logits(layer, stream[ends.to(self.device)]).float().cpu()
            offset = 0
            for i, s in enumerate(group):
                spec, n = s.spec, chunks[i].n
                m, lo = s.num_computed, spec.firm[j]
                out = stream[offset : offset + n]
                offset += n
                # firm from here on: p <= m - j; the carry is this layer's input it will not read again
                # at positions layer j+1 still needs (up to layer j-1's new firm end)
                firm = max(lo, m - j + 1)
                upto = new_firm[s.id][j - 1]
                spec.carry[j] = inputs[i][firm - lo : max(firm, upto) - lo].clone()
                new_firm[s.id].append(firm)
                prev[s.id] = out
                p = s.params
                if p.temperature <= 0:
                    spec.drafts.append(int(logits[i].argmax()))
                else:
                    q = _dist(logits[i : i + 1], p.temperature, p.top_p)
                    spec.drafts.append(int(draw(q, s.generator)[0]))
                    qs[s.id].append(q[0])
            assert offset == stream.shape[0] and H == stream.shape[-1]
        for s, cap in todo:
            spec = s.spec
            spec.firm[: cap + 1] = new_firm[s.id]
            if qs[s.id]:
                spec.q = torch.stack(qs[s.id])
