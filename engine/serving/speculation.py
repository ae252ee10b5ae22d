"""MTP speculation inside the serving core: the MTP layers draft over the paged cache, the step verifies.

A speculating sequence in decode (tokens x_0..x_m, the main model's cache holding x_0..x_{m-1}) runs
[x_m, d_1..d_k] in the step's flat batch; `accept` keeps the longest agreeing prefix (greedy) or applies
rejection sampling (`advisor.engine.model.speculative`), and the core shortens the sequence's block table to its
accepted tokens. Then `PagedDrafter.draft` runs the MTP layers for every sequence that goes on.

The MTP layers' keys and values live in the same block tables as the main model's (their own tensors,
`PagedKVCache` over the MTP layers; a block id holds a position's entries for every layer): layer j's
entry at position p goes in p's slot (RoPE at p + j, the embedded token's position, as
`advisor.engine.model.mtp` defines it). So they are bounded by the pool like the rest, dropped with a preempted
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
from advisor.engine.model import cpu_decode
from advisor.engine.model.layers import MLP, PANEL_ROWS, ColumnPanels, rope_tables, to_panels
from advisor.engine.model.mtp import head_logits, mtp_config
from advisor.engine.model.sampling import draw
from advisor.engine.model.speculative import _dist, accept_sampled
from advisor.engine.serving.paged_attention import ChunkTables, PagedKVCache, paged_meta
from advisor.engine.serving.sequence import Sequence


def accept(seq: Sequence, drafts: list[int], logits: torch.Tensor) -> list[int]:
    """The tokens a verify step adds: the accepted drafts, then the model's own (logits [k+1, V] fp32,
    the model's after x_m and after each draft)."""
    spec, p = seq.spec, seq.params
    assert spec is not None
    if p.temperature <= 0:  # `accept_greedy` for one row, on one host copy of the argmax
        best = logits.argmax(-1).tolist()
        n = 0
        while n < len(drafts) and best[n] == drafts[n]:
            n += 1
        nxt = best[n]
    else:
        target = _dist(logits, p.temperature, p.top_p)[None]
        assert spec.q is not None
        d = torch.tensor(drafts, dtype=torch.long)[None]
        ns, nx = accept_sampled(d, spec.q[None, : len(drafts)], target, seq.generator)
        n, nxt = ns[0], nx[0]
    spec.steps += 1
    spec.accepted += n
    return drafts[:n] + [nxt]


def feed(seq: Sequence, rows: torch.Tensor) -> None:
    """Hand the main model's stream h^0 [r, H] at the sequence's next r positions to its MTP layer 1."""
    spec = seq.spec
    assert spec is not None
    c = spec.carry[1]
    spec.carry[1] = rows.clone() if c is None else torch.cat([c, rows])
    spec.firm[0] += rows.shape[0]


class PagedDrafter:
    """The MTP layers over the paged cache, for every speculating sequence of a core.

    A drafting round is a few tokens per sequence through one layer, so on the CPU its cost is the glue
    between a dozen small ops, not their maths: where the compiled ops run (fp32 on the CPU, the block's
    projections in column panels, a dense MLP) each round is one `mtp_layer` call (the embedding, eh_proj,
    the block with its paged attention, the head and the argmax). Elsewhere, and for the long first round
    over a prompt, the layers run as modules (the definition; the same maths up to fp32 rounding).
    """

    def __init__(self, llm, main: PagedKVCache):
        self.model = model = llm.model
        self.device = llm.device
        cfg = mtp_config(model, len(model.mtp))
        missing = set(cfg.layer_types) - set(main.windows())
        if missing:  # a block table per attention type: the MTP layers need the main model's types
            raise ValueError(f"MTP layers of attention types {sorted(missing)} the main model lacks")
        self.cache = PagedKVCache(cfg, main.num_blocks, main.block_size, llm.dtype, llm.device)
        self._weights: dict[int, list[torch.Tensor] | None] = {}

    def _fused_weights(self, j: int) -> list[torch.Tensor] | None:
        """Layer j's (0-based) tensors in `mtp_layer`'s order, or None where that op cannot run it."""
        if j not in self._weights:
            self._weights[j] = None
            ops = cpu_decode.ops()
            layer = self.model.mtp[j]
            block, attn, mlp = layer.block, layer.block.attn, layer.block.mlp
            if ops is None or not hasattr(ops, "mtp_layer") or not isinstance(mlp, MLP):
                return None
            linears = (attn.qkvg, attn.o, mlp.gate_up, mlp.down)
            if not all(isinstance(m.layout, ColumnPanels) for m in linears):
                return None
            w = [
                layer.enorm.scale(),
                layer.hnorm.scale(),
                # eh_proj and the head in panels for the op's kernels (a copy: the modules keep theirs)
                to_panels(layer.eh_proj.detach()),
                block.input_norm.scale(),
                attn.qkvg.layout.panels,
                attn.q_norm.scale(),
                attn.k_norm.scale(),
                attn.o.layout.panels,
                block.post_attn_norm.scale(),
                mlp.gate_up.layout.panels,
                mlp.down.layout.panels,
                layer.head_norm.scale(),
                to_panels(layer.head.detach()),
            ]
            if cpu_decode.usable(*w, self.model.embed, self.cache.k[j]):
                self._weights[j] = w
        return self._weights[j]

    def _layer(self, j: int, ids: list[int], hid: torch.Tensor, chunks: list[ChunkTables], ends: list[int]):
        """Layer j (1-based) over the round's flat tokens: (its stream [T, H], the logits [len(ends), V]
        (fp32, on the CPU) at the flat rows `ends`, their argmax as a list or None)."""
        model, layer = self.model, self.model.mtp[j - 1]
        t = layer.block.attention_type
        w = self._fused_weights(j - 1) if self.cache.use_cpu_op and hid.shape[0] <= PANEL_ROWS else None
        if w is not None:
            tables = _table_tensor([c.tables[t] for c in chunks])
            cu = [0]
            for c in chunks:
                cu.append(cu[-1] + c.n)
            stream, logits, picks = cpu_decode.ops().mtp_layer(
                torch.tensor(ids, dtype=torch.long),
                hid.contiguous(),
                model.embed,
                w,
                model.inv_freq[t],
                j,
                self.cache.k[j - 1],
                self.cache.v[j - 1],
                tables,
                cu,
                [c.start for c in chunks],
                ends,
                *self._op_shape(layer.block),
            )
            return stream, logits, picks.tolist()
        meta = paged_meta(self.cache, chunks, self.device)
        e = layer.enorm(model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.device)[None]))
        x = F.linear(torch.cat([e, layer.hnorm(hid[None].to(self.device))], dim=-1), layer.eh_proj)
        rope = rope_tables(model.inv_freq, meta.positions + j, x.dtype)[t]
        stream = layer.block(x, rope, meta.types[t], None, j - 1)[0]  # [T, H]
        rows = torch.tensor(ends, device=self.device)
        return stream, head_logits(layer, stream[rows]).float().cpu(), None

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
        if not todo or self._draft_chained(todo):
            return
        prev: dict[int, torch.Tensor] = {}  # layer j-1's stream this round, per sequence
        new_firm: dict[int, list[int]] = {s.id: [s.num_computed] for s, _ in todo}
        qs: dict[int, list[torch.Tensor]] = {s.id: [] for s, _ in todo}
        for j in range(1, max(c for _, c in todo) + 1):
            group = [s for s, c in todo if c >= j]
            inputs, tokens, chunks, ends = [], [], [], []
            for s in group:
                spec = s.spec
                m, lo = s.num_computed, spec.firm[j]
                parts = [t for t in (spec.carry[j], prev.get(s.id)) if t is not None and t.shape[0]]
                h = torch.cat(parts) if len(parts) > 1 else parts[0]
                assert h.shape[0] == m - lo, (j, h.shape, m, lo)
                inputs.append(h)
                tokens.extend(_tokens(s, lo + j, m + j, spec.drafts))
                chunks.append(ChunkTables(lo, m - lo, s.tables))
                ends.append((ends[-1] if ends else -1) + m - lo)
            hid = torch.cat(inputs) if len(inputs) > 1 else inputs[0]
            stream, logits, picks = self._layer(j, tokens, hid, chunks, ends)
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
                kept = inputs[i][firm - lo : max(firm, upto) - lo]
                spec.carry[j] = kept.clone() if kept.shape[0] else None
                new_firm[s.id].append(firm)
                prev[s.id] = out
                p = s.params
                if p.temperature <= 0:
                    spec.drafts.append(picks[i] if picks is not None else int(logits[i].argmax()))
                else:
                    q = _dist(logits[i : i + 1], p.temperature, p.top_p)
                    spec.drafts.append(int(draw(q, s.generator)[0]))
                    qs[s.id].append(q[0])
            assert offset == stream.shape[0]
        for s, cap in todo:
            spec = s.spec
            spec.firm[: cap + 1] = new_firm[s.id]
            if qs[s.id]:
                spec.q = torch.stack(qs[s.id])

    def _op_shape(self, block) -> tuple:
        """The compiled MTP ops' trailing arguments for a layer's block: block size, window, query heads,
        MLP width, norm eps, attention scale, SwiGLU limit."""
        attn, mlp = block.attn, block.mlp
        window = self.cache.windows()[block.attention_type] or 0
        return self.cache.block_size, window, attn.h, mlp.inter, attn.q_norm.eps, attn.scale, mlp.limit

    def _chain(self, todo: list[tuple[Sequence, int]]) -> str | None:
        """The attention type of the MTP layers where `mtp_draft` can run this round's greedy drafts in one
        call (compiled weights for every layer it needs, one attention type, at most PANEL_ROWS rows a
        layer), else None."""
        if not self.cache.use_cpu_op or any(s.params.temperature > 0 for s, _ in todo):
            return None
        k = max(c for _, c in todo)
        blocks = [self.model.mtp[j].block for j in range(k)]
        types = {b.attention_type for b in blocks}
        shapes = {self._op_shape(b) for b in blocks}
        if len(types) != 1 or len(shapes) != 1 or any(self._fused_weights(j) is None for j in range(k)):
            return None
        for j in range(1, k + 1):
            if sum(s.num_computed - s.spec.firm[j] for s, c in todo if c >= j) > PANEL_ROWS:
                return None
        return types.pop()

    def _draft_chained(self, todo: list[tuple[Sequence, int]]) -> bool:
        """Greedy drafts of every layer for all of `todo` in one `mtp_draft` call (the rule of the loop in
        `draft`, which runs where this returns False): on a small model a round's cost is the glue between
        the layers, not their maths."""
        t = self._chain(todo)
        if t is None:
            return False
        k = max(c for _, c in todo)
        tables = _table_tensor([s.tables[t] for s, _ in todo])
        ms, caps, firm, toks, froms, carry = [], [], [], [], [], []
        for s, cap in todo:
            spec, m = s.spec, s.num_computed
            lo = spec.firm[1 : cap + 1]
            a = min(f + j for j, f in enumerate(lo, 1))
            ms.append(m)
            caps.append(cap)
            firm.append(lo)
            froms.append(a)
            toks.append(_tokens(s, a, m + 1, []))
            carry.append([c if c is not None else _EMPTY for c in spec.carry[1 : cap + 1]])
        drafts, new_firm, new_carry = cpu_decode.ops().mtp_draft(
            self.model.embed,
            [self._fused_weights(j) for j in range(k)],
            [self.model.inv_freq[t]] * k,
            [self.cache.k[j] for j in range(k)],
            [self.cache.v[j] for j in range(k)],
            tables,
            ms,
            caps,
            firm,
            toks,
            froms,
            carry,
            *self._op_shape(self.model.mtp[0].block),
        )
        for (s, cap), d, f, c in zip(todo, drafts, new_firm, new_carry, strict=True):
            spec = s.spec
            spec.drafts = d
            spec.firm[: cap + 1] = f
            for j, rows in enumerate(c, 1):
                spec.carry[j] = rows if rows.shape[0] else None
        return True


_EMPTY = torch.empty(0)


def _table_tensor(tables: list[list[int | None]]) -> torch.Tensor:
    """Block tables [N, width] int64 for the compiled ops: -1 where a block is freed or absent."""
    width = max(len(tb) for tb in tables)
    return torch.tensor([[-1 if b is None else b for b in tb] + [-1] * (width - len(tb)) for tb in tables])


def _tokens(seq: Sequence, a: int, b: int, drafts: list[int]) -> list[int]:
    """Tokens [a, b) of the sequence followed by its drafts so far."""
    n, p = seq.num_tokens, len(seq.prompt)
    out = []
    if a < p:
        out.extend(seq.prompt[a : min(b, p)])
    if b > p and a < n:
        out.extend(seq.output[max(a, p) - p : min(b, n) - p])
    if b > n:
        out.extend(drafts[max(a, n) - n : b - n])
    return out
