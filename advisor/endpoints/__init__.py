"""Model endpoints: OpenAI-compatible, Anthropic Messages, and the embedded engine."""

from advisor.endpoints.base import Endpoint, EndpointConfig, EndpointError

__all__ = ["Endpoint", "EndpointConfig", "EndpointError"]
