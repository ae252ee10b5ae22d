"""Each sequence's next token from its row of logits: its logit adjustments (presence and frequency
penalties over its output so far, `logit_bias`), then greedy or seeded temperature / top-p sampling; and,
only for sequences that ask, the log-probabilities of the raw logits (vLLM's default: before any
adjustment, temperature or top-p), so the default path computes nothing extra."""

from __future__ import annotations

import torch
from advisor.engine.model.sampling import sample
from advisor.engine.serving.sequence import Sequence, TokenLogprobs


def sample_next(logits: torch.Tensor, seqs: list[Sequence]) -> dict[int, int]:
    """logits [len(seqs), V] (fp32) -> the next token of each sequence, keyed by sequence id; sets
    `next_logprobs` on the sequences whose params ask for logprobs."""
    wants = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    raw = torch.log_softmax(logits[wants], dim=-1) if wants else None
    adjust = [i for i, s in enumerate(seqs) if s.params.adjusts_logits]
    if adjust:
        logits = logits.clone()
        for i in adjust:
            _adjust(logits[i], seqs[i])
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
    if raw is not None:
        # The top-k and the sampled token's entry on the device; only those few numbers come back.
        k = max(seqs[i].params.logprobs for i in wants)
        picked = torch.tensor([out[seqs[i].id] for i in wants], dtype=torch.long, device=raw.device)
        chosen = raw.gather(1, picked[:, None])[:, 0].tolist()
        top_v, top_i = raw.topk(k, dim=-1) if k else (raw[:, :0], raw[:, :0].long())
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for row, i in enumerate(wants):
            n = seqs[i].params.logprobs
            top = tuple(zip(top_i[row][:n], top_v[row][:n], strict=True))
            seqs[i].next_logprobs = TokenLogprobs(chosen[row], top)
    return out


def _adjust(row: torch.Tensor, seq: Sequence) -> None:
    """In place on one row of logits, as vLLM does: minus frequency_penalty per earlier occurrence of a
    token in the output and presence_penalty once if it occurs at all; plus the token's logit_bias."""
    p = seq.params
    if (p.presence_penalty or p.frequency_penalty) and seq.output:
        out = torch.tensor(seq.output, dtype=torch.long, device=row.device)
        counts = torch.bincount(out, minlength=row.numel())[: row.numel()].to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=row.device)
        bias = torch.tensor([b for _, b in p.logit_bias], dtype=row.dtype, device=row.device)
        row.index_add_(0, ids, bias)
