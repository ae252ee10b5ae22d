"""The proxy's HTTP face (starlette): one model to the harness, Advisor Mode behind it.

Routes: `POST /v1/chat/completions` (OpenAI), `POST /v1/messages` (Anthropic Messages) and its
`/count_tokens` (an estimate), `GET /v1/models`, `GET /` (the live report page), `GET /health`.
The same routes without `/v1` are served too, for clients whose base URL already ends in /v1.

Every reply carries `x-advisor-session`, `x-advisor-role` (executor | frontier), `x-advisor-model`
(the upstream model that answered), `x-advisor-cost-usd` (the session's running cost) and, when the
request set off a consult, `x-advisor-consult` (trigger=outcome). Errors come in the client's wire
format with a one-line message.

A streamed request is streamed through: its headers go out with the upstream's first delta (so the
cost header is the session's cost before this call, whose usage ends the stream), each delta is
forwarded as it arrives, and a failure before the first delta is an HTTP error like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.routing import Route

from advisor import fastjson
from advisor.endpoints.stream import StreamEnd
from advisor.escalation import estimate_tokens
from advisor.proxy import report
from advisor.proxy.router import ProxyError, Routed, RoutedStream, Router
from advisor.proxy.sessions import Session
from advisor.proxy.wire import ANTHROPIC, OPENAI, Events, Wire

SESSION_HEADER = "x-advisor-session"
log = logging.getLogger("advisor.proxy")
_BIG_BODY = 256 * 1024  # bodies above this (images, long contexts) are decoded off the event loop


class JSONResponse(StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        return fastjson.dumps(content)  # starlette's format (compact, UTF-8), in a fraction of the time


def _kind(status: int) -> str:
    return {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large"}.get(
        status, "api_error"
    )


class ProxyApp:
    def __init__(self, router: Router):
        self.router = router
        self.config = router.config

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, p) for p in self.config.models)

    def app(self) -> Starlette:
        routes = []
        for prefix in ("/v1", ""):
            routes += [
                Route(f"{prefix}/chat/completions", self.chat_completions, methods=["POST"]),
                Route(f"{prefix}/messages", self.messages, methods=["POST"]),
                Route(f"{prefix}/messages/count_tokens", self.count_tokens, methods=["POST"]),
                Route(f"{prefix}/models", self.models, methods=["GET"]),
            ]
        routes += [Route("/", self.page, methods=["GET"]), Route("/health", self.health, methods=["GET"])]

        @contextlib.asynccontextmanager
        async def lifespan(_app):
            yield
            await self.router.aclose()

        return Starlette(routes=routes, lifespan=lifespan)

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _headers(session: Session | None, routed: Routed | RoutedStream | None = None) -> dict[str, str]:
        h: dict[str, str] = {}
        if session is not None:
            h[SESSION_HEADER] = session.id
            h["x-advisor-cost-usd"] = f"{session.ledger.total_usd:.8f}"
        if routed is not None:
            h["x-advisor-role"] = routed.role
            h["x-advisor-model"] = routed.model
            if routed.consult is not None:
                h["x-advisor-consult"] = f"{routed.consult.trigger}={routed.consult.kind}"
        return h

    @staticmethod
    def _error(wire: Wire, status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(wire.error(status, kind, message), status_code=status, headers=headers)

    async def _body(self, request: Request) -> Any:
        raw = await request.body()
        if not raw:
            raise ValueError("the request body is empty; send a JSON object")
        try:
            if len(raw) > _BIG_BODY:
                return await asyncio.to_thread(fastjson.loads, raw)
            return fastjson.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"the request body is not valid JSON ({getattr(e, 'msg', e)})") from None

    # -- routes ------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self._chat(request, OPENAI)

    async def messages(self, request: Request) -> Response:
        return await self._chat(request, ANTHROPIC)

    async def _chat(self, request: Request, wire: Wire) -> Response:
        try:
            body = await self._body(request)
            parsed = wire.parse(body)
        except ValueError as e:
            return self._error(wire, 400, "invalid_request_error", f"advisor proxy: {e}")
        if not self.serves(parsed.model):
            return self._error(
                wire,
                404,
                "not_found_error",
                f"advisor proxy: unknown model '{parsed.model}'; this proxy serves {', '.join(self.config.models)}",
            )
        route = self.router.stream if parsed.stream else self.router.handle
        try:
            routed = await route(parsed.chat, request.headers.get(SESSION_HEADER))
        except ProxyError as e:
            return self._error(wire, e.status, e.kind, e.message, self._headers(e.session))
        except Exception as e:  # a bug of ours: the harness still gets its format and one line
            log.exception("advisor proxy: request failed")
            return self._error(wire, 500, "api_error", _internal(e))
        headers = self._headers(routed.session, routed)
        if isinstance(routed, Routed):
            return JSONResponse(wire.reply(routed.response, parsed.model), headers=headers)
        events = wire.events(parsed.model, parsed.include_usage)
        return _Relay(routed, _relay(routed, events), {**headers, "cache-control": "no-cache"})

    async def count_tokens(self, request: Request) -> Response:
        try:
            parsed = ANTHROPIC.parse({"max_tokens": 1, **(await self._body(request))})
        except (ValueError, TypeError) as e:
            return self._error(ANTHROPIC, 400, "invalid_request_error", f"advisor proxy: {e}")
        schemas = sum(len(json.dumps(t.parameters)) // 4 for t in parsed.chat.tools or [])
        return JSONResponse({"input_tokens": estimate_tokens(parsed.chat.messages) + schemas})

    async def models(self, request: Request) -> Response:
        names = [m for m in self.config.models if not any(ch in m for ch in "*?[")]
        data = [
            {
                "id": m,
                "object": "model",
                "type": "model",
                "display_name": f"{m} (advisor proxy)",
                "created": 0,
                "created_at": "1970-01-01T00:00:00Z",
                "owned_by": "advisor",
            }
            for m in names
        ]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "has_more": False,
                "first_id": names[0] if names else None,
                "last_id": names[-1] if names else None,
            }
        )

    async def page(self, request: Request) -> Response:
        return HTMLResponse(report.render_html(report.results(self.router.store)))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "sessions": len(self.router.store.sessions)})


def _internal(e: Exception) -> str:
    return f"advisor proxy: internal error: {type(e).__name__}: {e}"


async def _relay(routed: RoutedStream, events: Events) -> AsyncIterator[str]:
    """The client's stream: each upstream delta translated as it arrives; a failure after the first
    byte ends it with an error event in the client's format (the call is booked by the router)."""
    yield "".join(events.start())
    try:
        async for delta in routed:
            if isinstance(delta, StreamEnd):
                yield "".join(events.end(delta.response))
            else:
                yield "".join(events.delta(delta))
    except ProxyError as e:
        yield "".join(events.fail(e.kind, e.message))
    except Exception as e:
        log.exception("advisor proxy: stream failed")
        yield "".join(events.fail("api_error", _internal(e)))


class _Relay(StreamingResponse):
    """A relayed stream that closes its upstream however the response ends: done, failed, or the
    client gone (starlette cancels the body then; the upstream request is closed with it)."""

    def __init__(self, routed: RoutedStream, body: AsyncIterator[str], headers: dict[str, str]):
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self.routed = routed

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.routed.aclose()


def build_app(router: Router) -> Starlette:
    return ProxyApp(router).app()
