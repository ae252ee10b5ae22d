"""Who may talk to a server: API-key checks and the bind-address rule, shared by `advisor serve` and
`advisor proxy` (no torch, no starlette: the proxy imports it on its hot path).

- `key_matches`: a presented key against the expected one in constant time. Both are hashed first, so
  neither their lengths nor how much of a wrong key matched changes the time the comparison takes.
- `presented_key`: the key a request carries, read the way each SDK sends it: `Authorization: Bearer`
  (OpenAI, Responses) or `x-api-key` (Anthropic).
- `key_in_query`: a request that put a key in its URL (which ends up in access logs and browser
  histories) is refused whatever the key is.
- `open_host_refusal`: a server bound beyond loopback with no key configured refuses to start.
- `BearerAuth`: the ASGI wrapper `advisor serve` puts around its app.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl

ENV_API_KEY = "ADVISOR_API_KEY"
_QUERY_KEYS = {"key", "api_key", "api-key", "apikey", "token", "access_token", "x-api-key"}


def key_matches(given: str | bytes | None, expected: str | bytes) -> bool:
    if given is None:
        return False
    g = given.encode("latin-1", "replace") if isinstance(given, str) else given
    e = expected.encode() if isinstance(expected, str) else expected
    return hmac.compare_digest(hashlib.sha256(g).digest(), hashlib.sha256(e).digest())


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key of an ASGI scope's headers: a Bearer token first, else x-api-key; None if neither."""
    bearer = api_key = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
        elif name == b"x-api-key" and value:
            api_key = value.decode("latin-1").strip()
    return bearer or api_key


def key_in_query(query_string: bytes) -> bool:
    if not query_string:
        return False
    return any(k.lower() in _QUERY_KEYS for k, _ in parse_qsl(query_string.decode("latin-1")))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that resolves elsewhere (or to anything) counts as reachable


def open_host_refusal(prog: str, host: str, authenticated: bool, allowed: bool, how: str) -> str | None:
    """The one line a server prints (then exits 2) when it would answer anyone on the network, else None."""
    if authenticated or allowed or is_loopback(host):
        return None
    return (
        f"{prog}: refusing to listen on {host} without authentication: anyone who can reach the port could "
        f"use it; {how}, or pass --allow-unauthenticated to do so on purpose"
    )


def openai_error(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class BearerAuth:
    """ASGI: every HTTP request but those to `open_paths` needs `Authorization: Bearer <key>` (x-api-key is
    taken too); a 401 in the OpenAI error shape otherwise."""

    def __init__(
        self,
        app: Callable[[dict, Any, Any], Awaitable[None]],
        key: str,
        open_paths: Iterable[str] = ("/health",),
        prog: str = "advisor serve",
    ):
        self.app, self.key, self.open, self.prog = app, key, frozenset(open_paths), prog

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open:
            return await self.app(scope, receive, send)
        if key_in_query(scope.get("query_string", b"")):
            message = f"{self.prog}: an API key in the URL is refused; send it as Authorization: Bearer"
        elif key_matches(presented_key(scope["headers"]), self.key):
            return await self.app(scope, receive, send)
        elif presented_key(scope["headers"]) is None:
            message = f"{self.prog}: no API key; send Authorization: Bearer <key>"
        else:
            message = f"{self.prog}: invalid API key"
        body = json.dumps(openai_error(message, "authentication_error", "invalid_api_key")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
