"""Prices (USD per million tokens), the one formula that turns usage into dollars, and how dollars print."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from advisor.messages import Usage


class Price(BaseModel):
    """USD per million tokens. `cache_write` defaults to the input price; `reasoning` to the output price."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    output: float = Field(ge=0)
    cache_write: float | None = Field(default=None, ge=0)
    reasoning: float | None = Field(default=None, ge=0)

    def cost(self, usage: Usage) -> float:
        cached = self.input if self.cached_input is None else self.cached_input
        write = self.input if self.cache_write is None else self.cache_write
        reasoning = self.output if self.reasoning is None else self.reasoning
        return (
            usage.input * self.input
            + usage.cached_input * cached
            + usage.cache_write * write
            + usage.output * self.output
            + usage.reasoning * reasoning
        ) / 1e6


FREE = Price(input=0.0, cached_input=0.0, output=0.0)


def usd(x: float | None) -> str:
    """Dollars as every table and report prints them: the sign before the symbol (`-$0.2460`), six
    decimals under a cent, four under $100, cents with thousands separators above; None is `n/a`."""
    if x is None:
        return "n/a"
    sign, a = ("-" if x < 0 else ""), abs(x)
    body = f"{a:,.6f}" if a < 0.01 else f"{a:,.4f}" if a < 100 else f"{a:,.2f}"
    return f"{sign}${body}"


PRICE_DATA = Path(__file__).parent / "data" / "prices.yaml"


@cache
def known_prices() -> dict[str, Price]:
    """The list prices of the models the project knows (`advisor/data/prices.yaml`), by model name."""
    raw = yaml.safe_load(PRICE_DATA.read_text(encoding="utf-8")) or {}
    return {name: Price.model_validate(p) for name, p in raw.items()}


def known_price(model: str) -> Price | None:
    return known_prices().get(model)


def per_million(p: Price) -> str:
    """A price as one short phrase: `$0.20 in / $0.04 cached / $1.15 out per M tokens`."""
    def d(x: float) -> str:
        return f"${x:.2f}" if round(x, 2) == x else f"${x:g}"

    cached = f" / {d(p.cached_input)} cached" if p.cached_input is not None else ""
    return f"{d(p.input)} in{cached} / {d(p.output)} out per M tokens"
