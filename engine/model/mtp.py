"""Drafting with the checkpoint's multi-token-prediction (MTP) layers, each with its own KV cache.

The definition (DeepSeek-V3's MTP, which Step 3.7 Flash's three layers follow): with h^0 the main model's
last-layer output stream (before the final norm) and x the token sequence, MTP layer j (1-based) at
position p reads the previous depth's hidden state there and the token j ahead,

    h^j_p = block_j(eh_proj_j(cat[enorm_j(embed(x_{p+j})), hnorm_j(h^{j-1}_p)]))      (causal over p)
    logits^j_p = shared_head_j(h^j_p)                                                 (predicts x_{p+j+1})

so with tokens known up to x_m (the main model has seen x_0..x_{m-1}), layer 1 at p = m-1 drafts x_{m+1},
layer 2 at p = m-1 reads that draft and drafts x_{m+2}, and so on: k drafts by chaining the layers.
RoPE and masks use the position of the token a layer embeds (p + j), as transformers' MTP does; only
differences of positions matter, so this is the same attention.

Caching: layer j's entry at p depends on x_{p+j}, so it is firm once p + j <= m and is otherwise built on
drafts. Each round, layer j computes positions [F_j, m-1] (F_j: its firm length), drafts from the last,
then truncates its cache back to the firm entries, F_j = m - j + 1, and keeps h^j at the one firm position
m - j that layer j+1 starts from next round. `mtp_logits` is the same maths over a whole sequence without
a cache: what training optimises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from advisor.engine.model.backbone import MTPLayer, StepTextModel
from advisor.engine.model.cache import KVCache, StepMeta, uncached_meta
from advisor.engine.model.layers import rope_tables


def layer_forward(
    model: StepTextModel,
    layer: MTPLayer,
    tokens: torch.Tensor,
    prev_hidden: torch.Tensor,
    meta: StepMeta,
    cache: KVCache | None,
    index: int,
) -> torch.Tensor:
    """One MTP layer: tokens [B, T] (the tokens it embeds), prev_hidden [B, T, H] -> its stream [B, T, H]."""
    e = layer.enorm(model.embed_tokens(tokens))
    x = F.linear(torch.cat([e, layer.hnorm(prev_hidden)], dim=-1), layer.eh_proj)
    t = layer.block.attention_type
    rope = rope_tables(model.inv_freq, meta.positions, x.dtype)[t]
    return layer.block(x, rope, meta.types[t], cache, index)


def head_logits(layer: MTPLayer, stream: torch.Tensor) -> torch.Tensor:
    """The layer's own head (`shared_head.norm`, `shared_head.output`)."""
    return F.linear(layer.head_norm(stream), layer.head)


def mtp_config(model: StepTextModel, k: int):
    """The text config whose layers are the first k MTP layers (their KV cache and masks)."""
    return dataclasses.replace(model.cfg, layers=list(model.cfg.mtp_layers[:k]))


def mtp_streams(
    model: StepTextModel, hidden: torch.Tensor, ids: torch.Tensor, k: int | None = None, start: int = 0
) -> list[torch.Tensor]:
    """Over whole sequences, no cache: hidden [B, T, H] (main model, positions start..start+T-1), ids
    [B, T'] from the same position -> for each depth j = 1..k, layer j's stream [B, n_j, H] at positions
    p < n_j = min(T, T' - j) (each layer reads ids[p + j]). `start` only shifts RoPE's positions."""
    k = len(model.mtp) if k is None else k
    cfg = mtp_config(model, k)
    B = hidden.shape[0]
    out, h = [], hidden
    for j in range(1, k + 1):
        n = min(h.shape[1], ids.shape[1] - j)
        if n <= 0:
            break
        positions = torch.arange(start + j, start + j + n, device=ids.device).expand(B, -1)
        layer = model.mtp[j - 1]
        tokens = ids[:, j : j + n]
        h = layer_forward(model, layer, tokens, h[:, :n], uncached_meta(cfg, positions), None, j - 1)
        out.append(h)
    return out


def mtp_logits(
    model: StepTextModel, hidden: torch.Tensor, ids: torch.Tensor, k: int | None = None
) -> list[torch.Tensor]:
    """`mtp_streams` through each layer's head: logits [B, n_j, vocab] per depth, predicting ids[p + j + 1]
    (with T' = T the last position's target lies past the sequence: training drops it)."""
    streams = mtp_streams(model, hidden, ids, k)
    return [head_logits(model.mtp[j], s) for j, s in enumerate(streams)]


Pick = Callable[[torch.Tensor], torch.Tensor]  # logits [B, vocab] (fp32) -> token ids [B]


class MTPDrafter:
    """The k MTP layers' caches and per-row state for a batch; `propose` drafts k tokens per row.

    Rows advance independently (each accepts its own number of tokens): `propose` takes, for each row, the
    main model's hidden states at the positions it verified and kept, and the row's tokens so far.
    """

    def __init__(
        self,
        model: StepTextModel,
        k: int,
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        if not 1 <= k <= len(model.mtp):
            raise ValueError(f"num_speculative_tokens must be in [1, {len(model.mtp)}], got {k}")
        self.model, self.k, self.batch = model, k, batch
        self.device = device
        # A round writes at most 2k columns per layer past its firm entries (the new positions plus the
        # j - 1 positions built on drafts), then takes them back: the ring's spare slots.
        self.caches = [
            KVCache(mtp_config(model, k), batch, max_len, dtype, device, spare=2 * k) for _ in range(k)
        ]
        self.firm = [[0] * batch for _ in range(k)]  # F_j per row: layer j's firm positions
        self.offset = [0] * batch  # cache columns of the first round's left padding
        self.carry: list[list[torch.Tensor | None]] = [[None] * batch for _ in range(k)]  # h^j at F_{j+1}
        self.started = False

    def propose(
        self,
        new_hidden: Sequence[torch.Tensor | None],
        seqs: Sequence[Sequence[int]],
        pick: Pick,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """new_hidden[b]: the main model's h^0 [n_b, H] at row b's positions [F_1, m_b - 1] (None or 0 rows:
        row b is frozen and keeps its state); seqs[b]: its tokens x_0..x_m. Returns drafts [B, k] and their
        logits [B, k, vocab] (fp32), each draft chosen by `pick` from its layer's logits."""
        B, k = self.batch, self.k
        active = [h is not None and h.shape[0] > 0 for h in new_hidden]
        m = [len(s) - 1 for s in seqs]
        drafts = torch.zeros(B, k, dtype=torch.long, device=self.device)
        all_logits = []
        prev: list[torch.Tensor | None] = [h if a else None for h, a in zip(new_hidden, active, strict=True)]
        first = not self.started
        carries = [list(c) for c in self.carry]  # next round's: this round reads the previous ones
        for j in range(1, k + 1):
            layer, cache = self.model.mtp[j - 1], self.caches[j - 1]
            # Row b's positions this round: [F_j, m-1], the first from the carry when layer j-1 starts later.
            hid, toks, poss = [], [], []
            for b in range(B):
                if not active[b]:
                    hid.append(None)
                    toks.append([])
                    poss.append([])
                    continue
                carry = self.carry[j - 2][b] if j > 1 else None
                h = prev[b] if carry is None else torch.cat([carry[None], prev[b]])
                start = self.firm[j - 1][b]
                assert h.shape[0] == m[b] - start, (j, b, h.shape, m[b], start)
                ext = list(seqs[b]) + drafts[b, : j - 1].tolist()
                hid.append(h)
                toks.append(ext[start + j : m[b] + j])
                poss.append(list(range(start + j, m[b] + j)))
            width = max([len(p) for p in poss] + [1])
            H = self.model.cfg.hidden_size
            x_h = torch.zeros(B, width, H, dtype=cache.k[0].dtype, device=self.device)
            x_t = torch.zeros(B, width, dtype=torch.long, device=self.device)
            x_p = torch.full((B, width), -1, dtype=torch.long, device=self.device)
            last = []
            for b in range(B):
                n = len(poss[b])
                # The first round is a prefill: left-padded, like the main model's (the ring path keeps only
                # the last columns of a long chunk); later rounds append at each row's own length.
                lo = width - n if first else 0
                if n:
                    x_h[b, lo : lo + n] = hid[b]
                    x_t[b, lo : lo + n] = torch.tensor(toks[b], device=self.device)
                    x_p[b, lo : lo + n] = torch.tensor(poss[b], device=self.device)
                last.append(lo + max(n - 1, 0))
            before = cache.lengths()
            stream = layer_forward(self.model, layer, x_t, x_h, cache.plan(x_p), cache, j - 1)
            rows = torch.arange(B, device=self.device)
            logits = head_logits(layer, stream[rows, torch.tensor(last, device=self.device)]).float()
            drafts[:, j - 1] = pick(logits)
            all_logits.append(logits)
            keep = []
            for b in range(B):
                if not active[b]:
                    keep.append(before[b])
                    continue
                lo = width - len(poss[b]) if first else 0
                if first:
                    self.offset[b] = lo
                start = self.firm[j - 1][b]
                firm = max(0, m[b] - j + 1)
                # h^j at position m - j (firm): where layer j+1 starts next round.
                if m[b] - j >= 0 and m[b] - j >= start:
                    carries[j - 1][b] = stream[b, lo + (m[b] - j - start)].clone()
                else:
                    carries[j - 1][b] = None
                prev[b] = stream[b, lo : lo + len(poss[b])]
                self.firm[j - 1][b] = firm
                keep.append(self.offset[b] + firm)
            cache.truncate(keep)
        self.carry = carries
        self.started = True
        return drafts, torch.stack(all_logits, dim=1)
