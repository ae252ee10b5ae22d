"""One engine step on the model: the scheduled chunks in, the new tokens of each finishing chunk out
(one sampled token, or a speculating sequence's accepted drafts and the model's own next token)."""

from __future__ import annotations

import torch
from advisor.engine.serving.paged_attention import ChunkTables, PagedKVCache, paged_meta
from advisor.engine.serving.sampler import sample_next
from advisor.engine.serving.scheduler import ScheduledChunk
from advisor.engine.serving.sequence import Sequence
from advisor.engine.serving.speculation import PagedDrafter, accept, feed


class ModelRunner:
    def __init__(self, llm, cache: PagedKVCache):
        self.llm, self.model, self.cache = llm, llm.model, cache
        self.device = llm.device
        self.image_token_id = llm.config.image_token_id
        self._drafter: PagedDrafter | None = None

    @property
    def drafter(self) -> PagedDrafter:
        """The MTP layers' drafting and their paged KV (allocated with the first speculating request)."""
        if self._drafter is None:
            self._drafter = PagedDrafter(self.llm, self.cache)
        return self._drafter

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> dict[int, list[int]]:
        """Computes every chunk's keys and values; returns the new tokens of each sequence whose chunk
        reached its last token (keyed by sequence id): one, or a verify step's accepted drafts and the
        model's own. Speculating sequences get the main model's stream at their computed positions."""
        ids = torch.tensor(
            [t for c in chunks for t in _slice(c.seq, c.start, c.n - len(c.drafts)) + c.drafts],
            dtype=torch.long,
            device=self.device,
        )
        embeds = self.model.embed_tokens(ids[None])
        offset = 0
        for c in chunks:
            if c.seq.images:
                self._place_image_features(embeds[0, offset : offset + c.n], c.seq, c.start, c.n)
            offset += c.n
        meta = paged_meta(self.cache, [ChunkTables(c.start, c.n, c.seq.tables) for c in chunks], self.device)
        rows, sampling, verify = [], [], []  # logits rows: one per sampling chunk, 1 + k per verify
        offset = 0
        for c in chunks:
            if c.drafts:
                verify.append((c, len(rows), offset))
                rows.extend(range(offset, offset + c.n))
            elif c.samples:
                sampling.append((c.seq, len(rows)))
                rows.append(offset + c.n - 1)
            offset += c.n
        speculating = any(c.seq.spec is not None for c in chunks)
        select = torch.tensor(rows or [offset - 1], device=self.device)
        out = self.model(embeds, meta, None, select=select, hidden=speculating)
        logits, stream = (out[0][0].float(), out[1][0]) if speculating else (out[0].float(), None)
        if not rows:
            logits = logits[:0]
        picked = sample_next(logits[[r for _, r in sampling]], [s for s, _ in sampling])
        result: dict[int, list[int]] = {sid: [t] for sid, t in picked.items()}
        for c, r, at in verify:
            toks = accept(c.seq, c.drafts, logits[r : r + c.n])
            result[c.seq.id] = toks
            feed(c.seq, stream[at : at + len(toks)])
        if stream is not None:
            offset = 0
            for c in chunks:
                if c.seq.spec is not None and not c.drafts:
                    feed(c.seq, stream[offset : offset + c.n])
                offset += c.n
        return result

    def prepare_images(self, seq: Sequence) -> None:
        """The sequence's image features, computed once (kept across chunks and preemptions)."""
        if seq.image_features is not None or not seq.images:
            return
        img = seq.images
        prompt = torch.tensor(seq.prompt, dtype=torch.long, device=self.device)
        embeds = self.llm._embed(
            prompt[None], img.get("pixel_values"), img.get("pixel_values_local"), img.get("num_local_patches")
        )
        seq.image_features = embeds[0][prompt == self.image_token_id]

    def _place_image_features(self, rows: torch.Tensor, seq: Sequence, start: int, n: int) -> None:
        """Image features replace the embeddings at the `<im_patch>` positions of this chunk."""
        end = min(start + n, len(seq.prompt))
        if start >= end or seq.image_features is None:
            return
        is_image = torch.tensor(seq.prompt[:end], dtype=torch.long) == self.image_token_id
        here = is_image[start:end]
        if bool(here.any()):
            rank = int(is_image[:start].sum())
            feats = seq.image_features[rank : rank + int(here.sum())]
            rows[: end - start][here.to(rows.device)] = feats.to(rows.dtype)


def _slice(seq: Sequence, start: int, n: int) -> list[int]:
    p = len(seq.prompt)
    if start + n <= p:
        return seq.prompt[start : start + n]
    return (seq.prompt + seq.output)[start : start + n]
