"""Next-token choice: greedy, or temperature + nucleus (top-p) sampling from a seeded generator."""

from __future__ import annotations

import torch


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] (fp32) -> token ids [B]."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    return draw(probs(logits, temperature, top_p), generator).to(logits.device)


def probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The distribution `sample` draws from (temperature > 0): logits [..., V] -> probabilities [..., V]."""
    p = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = p.sort(dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the most likely one always stays).
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        p = torch.zeros_like(p).scatter_(-1, order, sorted_p)
    return p


def draw(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of p [B, V] (unnormalised is fine), on the CPU generator: a seed gives the same
    tokens on any device."""
    return torch.multinomial(p.cpu(), 1, generator=generator).squeeze(-1)
