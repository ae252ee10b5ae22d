"""Shared set-up of the proxy tests: scripted upstreams, a proxy config pointing at them, a running proxy."""

from __future__ import annotations

from pathlib import Path

from advisor.pricing import Price
from advisor.proxy.config import ProxyConfig
from advisor.proxy.router import Router
from advisor.proxy.server import ProxyServer
from advisor.testing import ScriptedServer

EXEC_PRICE = Price(input=0.20, cached_input=0.04, output=1.15)
FRONTIER_PRICE = Price(input=3.0, cached_input=0.30, output=15.0)


def make_config(
    upstream: ScriptedServer,
    tmp: Path,
    *,
    executor_provider: str = "openai",
    frontier_provider: str = "anthropic",
    escalation: dict | None = None,
    budget: dict | None = None,
    sessions: dict | None = None,
    endpoint_fields: dict | None = None,
    **extra,
) -> ProxyConfig:
    fields = {"max_retries": 2, **(endpoint_fields or {})}
    cfg = ProxyConfig.model_validate(
        {
            "models": ["advisor", "claude-*"],
            "executor": {"endpoint": "flash", "effort": "low"},
            "frontier": {"endpoint": "big", "effort": "high"},
            "escalation": {"after_failures": 2, **(escalation or {})},
            "budget": budget or {"max_usd": 5.0},
            "sessions": {"dir": "sessions", "fsync": False, **(sessions or {})},
            "endpoints": {
                "flash": upstream.endpoint_config(
                    "flash", executor_provider, price=EXEC_PRICE, **fields
                ).model_dump(),
                "big": upstream.endpoint_config(
                    "big", frontier_provider, price=FRONTIER_PRICE, **fields
                ).model_dump(),
            },
            **extra,
        }
    )
    cfg._base_dir = tmp
    return cfg


def fast_router(cfg: ProxyConfig) -> Router:
    """A router whose endpoints retry without waiting (the retry count still comes from the config)."""
    from advisor.endpoints import make_endpoint
    from advisor.proxy.router import upstream_options

    async def no_sleep(_s: float) -> None:
        return None

    eps = {
        name: make_endpoint(
            name,
            cfg.endpoints[name],
            backoff_s=0.0,
            sleep=no_sleep,
            **upstream_options(cfg, cfg.endpoints[name]),
        )
        for name in (cfg.executor.endpoint, cfg.frontier.endpoint if cfg.frontier else None)
        if name
    }
    return Router(cfg, eps)


def proxy_for(cfg: ProxyConfig) -> ProxyServer:
    return ProxyServer(fast_router(cfg))
