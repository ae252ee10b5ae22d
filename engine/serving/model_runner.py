"""One engine step on the model: the scheduled chunks in, one sampled token per finishing chunk out."""

from __future__ import annotations

import torch

from engine.model.sampling import sample
from engine.serving.paged_attention import ChunkTables, PagedKVCache, paged_meta
from engine.serving.scheduler import ScheduledChunk
from engine.serving.sequence import Sequence


class ModelRunner:
    def __init__(self, llm, cache: PagedKVCache):
        self.llm, self.model, self.cache = llm, llm.model, cache
        self.device = llm.device
        self.image_token_id = llm.config.image_token_id

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> dict[int, int]:
        """Computes every chunk's keys and values; returns the next token of each sequence whose chunk
        reached its last token (keyed by sequence id)."""
        ids = torch.tensor(
            [t for c in chunks for t in _slice(c.seq, c.start, c.n)], dtype=torch.long, device=self.device
        )
        embeds = self.model.embed_tokens(ids[None])
        offset = 0
        for c in chunks:
            if c.seq.images:
                self._place_image_features(embeds[0, offset : offset + c.n], c.seq, c.start, c.n)
            offset += c.n
        meta = paged_meta(self.cache, [ChunkTables(c.start, c.n, c.seq.tables) for c in chunks], self.device)
        ends, sampling = [], []
        offset = 0
        for c in chunks:
            offset += c.n
            if c.samples:
                ends.append(offset - 1)
                sampling.append(c.seq)
        if not sampling:
            self.model(embeds, meta, None, select=torch.tensor([offset - 1], device=self.device))
            return {}
        logits = self.model(embeds, meta, None, select=torch.tensor(ends, device=self.device))[0].float()
        return _sample(logits, sampling)

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


def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> dict[int, int]:
    out: dict[int, int] = {}
    greedy = [i for i, s in enumerate(seqs) if s.params.temperature <= 0]
    if greedy:
        picked = logits[greedy].argmax(-1).tolist()
        for i, t in zip(greedy, picked, strict=True):
            out[seqs[i].id] = t
    for i, s in enumerate(seqs):
        if s.params.temperature > 0:
            t = sample(logits[i : i + 1], s.params.temperature, s.params.top_p, s.generator)
            out[s.id] = int(t[0])
    return out
