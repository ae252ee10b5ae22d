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
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the most likely one always stays).
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    # multinomial draws on the CPU generator, so a seed gives the same tokens on any device.
    picked = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1)
    return picked.to(logits.device)
