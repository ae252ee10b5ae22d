"""Model endpoints: OpenAI-compatible, Anthropic Messages, and the embedded engine."""

from __future__ import annotations

import importlib
from typing import Any

from advisor.endpoints.base import ChatRequest, Endpoint, EndpointConfig, EndpointError

__all__ = ["ChatRequest", "Endpoint", "EndpointConfig", "EndpointError", "make_endpoint"]


def make_endpoint(name: str, config: EndpointConfig, **options: Any) -> Endpoint:
    """The endpoint for `config.provider`. `options` go to the provider class (e.g. `transport`,
    `backoff_s`, `sleep` for the HTTP providers; `thinking_budgets` for anthropic).

    The embedded engine is imported only when asked for, so HTTP-only use never loads torch.
    """
    if config.provider == "openai":
        from advisor.endpoints.openai import OpenAIEndpoint

        return OpenAIEndpoint(name, config, **options)
    if config.provider == "anthropic":
        from advisor.endpoints.anthropic import AnthropicEndpoint

        return AnthropicEndpoint(name, config, **options)
    if config.provider == "embedded":
        try:
            module = importlib.import_module("advisor.endpoints.embedded")
        except ModuleNotFoundError as e:
            if e.name != "advisor.endpoints.embedded":
                raise
            raise EndpointError(
                name, "provider 'embedded' is not available: advisor.endpoints.embedded is missing"
            ) from None
        cls = getattr(module, "EmbeddedEndpoint", None)
        if cls is None:
            raise EndpointError(
                name, "provider 'embedded': advisor.endpoints.embedded defines no EmbeddedEndpoint"
            )
        return cls(name, config, **options)
    raise EndpointError(
        name, f"unknown provider {config.provider!r} (expected openai, anthropic or embedded)"
    )
