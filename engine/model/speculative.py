"""Speculative decoding with the MTP layers: draft, verify, accept, roll back.

One round for a batch whose rows each hold tokens x_0..x_m, the main model's cache having seen x_0..x_{m-1}:
1. draft: the MTP layers propose d_1..d_k per row (`advisor.engine.model.mtp.MTPDrafter`);
2. verify: one forward of the main model over [x_m, d_1..d_k] (k + 1 tokens per row) gives its
   distribution after each prefix;
3. accept: greedy keeps the longest prefix of drafts the model's argmax agrees with, plus the model's own
   next token; sampling keeps d_i with probability min(1, p_i(d_i) / q_i(d_i)), and at the first
   rejection draws from norm(max(0, p_i - q_i)) (after all k, from p_k): the standard speculative rejection
   sampling, so each token is distributed exactly as the model's own (Leviathan et al., Chen et al. 2023);
4. roll back: each row's cache is truncated to the columns of its accepted tokens (`KVCache.truncate`).

Rows accept different numbers of tokens and go on at their own cache lengths. `SpeculativeDecoder` is
that loop over the present static cache; a scheduler can run the same four steps per sequence, with the
rollback as the sequence's shortened cache length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from advisor.engine.model.backbone import StepTextModel
from advisor.engine.model.cache import KVCache
from advisor.engine.model.mtp import MTPDrafter
from advisor.engine.model.sampling import draw, probs, sample


def _dist(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    p = probs(logits, temperature, top_p)
    return p / p.sum(-1, keepdim=True)


def accept_greedy(drafts: torch.Tensor, target_logits: torch.Tensor) -> tuple[list[int], list[int]]:
    """drafts [B, k], target_logits [B, k+1, V] -> (accepted drafts per row, the model's next token)."""
    best = target_logits.argmax(-1)  # [B, k+1]
    match = (best[:, :-1] == drafts).long()
    n = match.cumprod(-1).sum(-1)  # length of the agreeing prefix
    nxt = best.gather(1, n[:, None])[:, 0]
    return n.tolist(), nxt.tolist()


def accept_sampled(
    drafts: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[list[int], list[int]]:
    """drafts [B, k] drawn from q [B, k, V]; p [B, k+1, V] the model's distributions (both normalised) ->
    (accepted drafts per row, the next token: a residual draw at the first rejection, else from p_k)."""
    B, k = drafts.shape
    p, q, drafts = p.cpu(), q.cpu(), drafts.cpu()
    u = torch.rand(B, k, generator=generator)
    pd = p[:, :k].gather(-1, drafts[..., None])[..., 0]
    qd = q.gather(-1, drafts[..., None])[..., 0]
    ok = (u * qd < pd).long()  # u < p/q without dividing by a q of 0
    n = ok.cumprod(-1).sum(-1).tolist()
    nxt = []
    for b in range(B):
        i = n[b]
        if i == k:
            nxt.append(int(draw(p[b, k][None], generator)[0]))
            continue
        resid = (p[b, i] - q[b, i]).clamp(min=0)
        if float(resid.sum()) <= 0:  # p == q up to rounding: any draw from p is right
            resid = p[b, i]
        nxt.append(int(draw(resid[None], generator)[0]))
    return n, nxt


class SpeculativeDecoder:
    """Speculative decoding of one left-padded batch on the main model's `cache` (built with spare >= k)."""

    def __init__(
        self,
        model: StepTextModel,
        cache: KVCache,
        k: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None,
    ):
        self.model, self.cache, self.k = model, cache, k
        self.temperature, self.top_p, self.gen = temperature, top_p, generator
        self.device = cache.k[0].device
        self.drafter = MTPDrafter(model, k, cache.batch, cache.max_len + 2 * k, cache.k[0].dtype, self.device)
        self.seqs: list[list[int]] = []
        self.active: list[bool] = []
        self.steps = 0  # verify forwards
        self.accepted = 0  # drafts accepted, all rows
        self.row_steps = 0  # verify steps of active rows

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature <= 0:
            return logits.argmax(-1)
        return draw(_dist(logits, self.temperature, self.top_p), self.gen).to(logits.device)

    def start(
        self, prompts: Sequence[Sequence[int]], logits: torch.Tensor, hidden: torch.Tensor
    ) -> list[int]:
        """After the prefill (logits [B, V] at each row's last prompt token, hidden [B, T, H] left-padded):
        the first token of every row, and the first drafts."""
        first = sample(logits.float(), self.temperature, self.top_p, self.gen).tolist()
        T = hidden.shape[1]
        self.seqs = [list(p) + [t] for p, t in zip(prompts, first, strict=True)]
        self.active = [True] * len(self.seqs)
        self._propose([hidden[b, T - len(p) :] for b, p in enumerate(prompts)])
        return first

    def _propose(self, new_hidden) -> None:
        self.drafts, self.draft_logits = self.drafter.propose(new_hidden, self.seqs, self._pick)

    def stop(self, b: int) -> None:
        """Row b needs no more tokens: it is frozen (its cache no longer grows)."""
        self.active[b] = False

    def step(self) -> list[list[int]]:
        """One draft-verify-accept-rollback round: each active row's new tokens (accepted drafts, then the
        model's own); [] for frozen rows."""
        B, k = len(self.seqs), self.k
        before = self.cache.lengths()
        last = torch.tensor([s[-1] for s in self.seqs], device=self.device)
        inputs = torch.cat([last[:, None], self.drafts], dim=1)
        m = torch.tensor([len(s) - 1 for s in self.seqs], device=self.device)
        positions = m[:, None] + torch.arange(k + 1, device=self.device)
        logits, hidden = self.model(
            self.model.embed_tokens(inputs), self.cache.plan(positions), self.cache, hidden=True
        )
        logits = logits.float()
        if self.temperature <= 0:
            n, nxt = accept_greedy(self.drafts, logits)
        else:
            q = _dist(self.draft_logits, self.temperature, self.top_p)
            p = _dist(logits, self.temperature, self.top_p)
            n, nxt = accept_sampled(self.drafts, q, p, self.gen)
        drafts = self.drafts.tolist()
        out: list[list[int]] = []
        keep, new_hidden = [], []
        self.steps += 1
        for b in range(B):
            if not self.active[b]:
                out.append([])
                keep.append(before[b])
                new_hidden.append(None)
                continue
            self.row_steps += 1
            self.accepted += n[b]
            toks = drafts[b][: n[b]] + [nxt[b]]
            out.append(toks)
            self.seqs[b].extend(toks)
            keep.append(before[b] + n[b] + 1)
            new_hidden.append(hidden[b, : n[b] + 1])
        self.cache.truncate(keep)
        if any(self.active):
            self._propose(new_hidden)
        return out
