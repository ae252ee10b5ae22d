"""Advisor Mode for existing harnesses: an OpenAI- and Anthropic-compatible proxy that sends each
request to the executor or the frontier by the loop's escalation policy, with the same cost ledger.

    advisor proxy --config proxy.yaml --port 4000      # then point the harness at http://127.0.0.1:4000
    advisor proxy report --config proxy.yaml           # report.md / report.html of every session

In Python: `Router(config)` decides and calls; `build_app(router)` is the ASGI app.
"""

from advisor.proxy.app import SESSION_HEADER, build_app
from advisor.proxy.config import ProxyConfig, load_proxy_config
from advisor.proxy.router import ProxyError, Routed, Router
from advisor.proxy.sessions import SessionStore

__all__ = [
    "SESSION_HEADER",
    "ProxyConfig",
    "ProxyError",
    "Routed",
    "Router",
    "SessionStore",
    "build_app",
    "load_proxy_config",
]
