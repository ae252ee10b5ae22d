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

The two chat routes are plain ASGI handlers that the app calls before starlette's routing (a table
of their paths; starlette's middleware, routing and Response objects cost more CPU per request than
the proxy's own work): they read the body and one header from the scope, and send each reply as one
head and one body message. Everything else, and a wrong method on a chat path, goes through starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from advisor import fastjson
from advisor.endpoints.stream import StreamEnd
from advisor.escalation import estimate_tokens
from advisor.proxy import report
from advisor.proxy.admin import admin_routes
from advisor.proxy.auth import ANYONE, CURRENT, Gate, Principal, Refused
from advisor.proxy.coalesce import CoalescingHttpToolsProtocol
from advisor.proxy.router import ProxyError, Routed, RoutedStream, Router
from advisor.proxy.sessions import Session
from advisor.proxy.wire import ANTHROPIC, OPENAI, Events, Wire

SESSION_HEADER = "x-advisor-session"
_SESSION_HEADER = SESSION_HEADER.encode()
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
log = logging.getLogger("advisor.proxy")
_BIG_BODY = 256 * 1024  # bodies above this (images, long contexts) are decoded off the event loop


class JSONResponse(StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        return fastjson.dumps(content)  # starlette's format (compact, UTF-8), in a fraction of the time


def _kind(status: int) -> str:
    return {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large"}.get(
        status, "api_error"
    )


def _wire_of(path: str) -> Wire:
    return ANTHROPIC if "/messages" in path else OPENAI


class _TooLarge(Exception):
    pass


def _too_large(wire: Wire, limit: int) -> _Reply:
    return _Reply.error(wire, 413, "request_too_large", _too_large_message(limit))


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _refusal(wire: Wire, r: Refused) -> _Reply:
    headers = [(b"retry-after", b"%d" % r.retry_after)] if r.retry_after is not None else []
    if r.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    return _Reply.error(wire, r.status, r.kind, r.message, headers)


class ProxyApp:
    def __init__(self, router: Router, gate: Gate | None = None):
        self.router = router
        self.config = router.config
        self.gate = gate if gate is not None else Gate(self.config)
        if self.gate.store is not None:
            router.meter = self.gate
            self.gate.journal = router.store

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, p) for p in self.config.models)

    def app(self) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        routes = []
        hot: dict[str, _Chat] = {}
        for prefix in ("/v1", ""):
            for path, wire in ((f"{prefix}/chat/completions", OPENAI), (f"{prefix}/messages", ANTHROPIC)):
                hot[path] = _Chat(self, wire)
                routes.append(Route(path, hot[path], methods=["POST"]))
            routes += [
                Route(f"{prefix}/messages/count_tokens", self.count_tokens, methods=["POST"]),
                Route(f"{prefix}/models", self.models, methods=["GET"]),
            ]
        routes += [Route("/", self.page, methods=["GET"]), Route("/health", self.health, methods=["GET"])]
        routes += admin_routes(self.gate)

        @contextlib.asynccontextmanager
        async def lifespan(_app):
            await self.gate.open()
            await self.gate.import_sessions(self.router.store)  # an old journal's sessions, once
            try:
                yield
            finally:
                await self.router.aclose()
                await self.gate.close()

        async def too_large(request: Request, exc: Exception) -> Response:
            return self._error(_wire_of(request.url.path), 413, "request_too_large", str(exc))

        routed = Starlette(routes=routes, lifespan=lifespan, exception_handlers={_TooLarge: too_large})
        limit = self.config.max_request_bytes
        gate = self.gate

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return await routed(scope, receive, send)
            path = scope["path"]
            if scope["method"] == "POST":
                chat = hot.get(path)
                if chat is not None:
                    return await chat(scope, receive, send)
            # the other routes: the same key rules (/ and /admin need the master key; /health is open)
            if gate.enabled and path != "/health":
                try:
                    principal = await gate.admit(scope, master_only=path == "/" or path.startswith("/admin"))
                except Refused as r:
                    return await _refusal(_wire_of(path), r).send(send)
                scope = {**scope, "state": {**scope.get("state", {}), "principal": principal}}
            declared = _declared_length(scope)
            if declared is not None and declared > limit:
                return await _too_large(_wire_of(path), limit).send(send)
            seen = 0

            async def bounded() -> Message:
                nonlocal seen
                message = await receive()
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(_too_large_message(limit))
                return message

            await routed(scope, bounded, send)

        return app

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _headers(
        session: Session | None, routed: Routed | RoutedStream | None = None
    ) -> list[tuple[bytes, bytes]]:
        h: list[tuple[bytes, bytes]] = []
        if session is not None:
            h.append((_SESSION_HEADER, session.id.encode("latin-1")))
            h.append((b"x-advisor-cost-usd", b"%.8f" % session.ledger.total_usd))
        if routed is not None:
            h.append((b"x-advisor-role", routed.role.encode("latin-1")))
            h.append((b"x-advisor-model", routed.model.encode("latin-1")))
            made = [routed.consult] if routed.consult is not None else []
            made += getattr(routed, "tool_consults", [])  # the executor's advisor-tool calls
            if made:
                consult = ", ".join(f"{c.trigger}={c.kind}" for c in made)
                h.append((b"x-advisor-consult", consult.encode("latin-1")))
        return h

    @staticmethod
    async def _json(raw: bytes) -> Any:
        if not raw:
            raise ValueError("the request body is empty; send a JSON object")
        try:
            if len(raw) > _BIG_BODY:
                return await asyncio.to_thread(fastjson.loads, raw)
            return fastjson.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"the request body is not valid JSON ({getattr(e, 'msg', e)})") from None

    async def _body(self, request: Request) -> Any:
        return await self._json(await request.body())

    async def chat(
        self, raw: bytes, session_id: str | None, wire: Wire, principal: Principal = ANYONE
    ) -> _Reply | _Stream:
        """One chat request: its body and session header in, the reply (or stream) to send out."""
        try:
            parsed = wire.parse(await self._json(raw))
        except ValueError as e:
            return _Reply.error(wire, 400, "invalid_request_error", f"advisor proxy: {e}")
        try:
            self.gate.check_model(principal, parsed.model)
        except Refused as r:
            return _refusal(wire, r)
        if not self.serves(parsed.model):
            return _Reply.error(
                wire,
                404,
                "not_found_error",
                f"advisor proxy: unknown model '{parsed.model}'; this proxy serves {', '.join(self.config.models)}",
            )
        route = self.router.stream if parsed.stream else self.router.handle
        try:
            routed = await route(parsed.chat, session_id, parsed.advisor)
        except ProxyError as e:
            return _Reply.error(wire, e.status, e.kind, e.message, self._headers(e.session))
        except Exception as e:  # a bug of ours: the harness still gets its format and one line
            log.exception("advisor proxy: request failed")
            return _Reply.error(wire, 500, "api_error", _internal(e))
        headers = self._headers(routed.session, routed)
        if isinstance(routed, Routed):
            return _Reply(200, headers, fastjson.dumps(wire.reply(routed.response, parsed.model)))
        return _Stream(routed, wire.events(parsed.model, parsed.include_usage), headers)

    # -- the other routes --------------------------------------------------------------------
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
        res = report.results(self.router.store)
        if self.gate.store is not None:
            res["spend"] = await report.spend(self.gate.store)
        return HTMLResponse(report.render_html(res))

    def _error(self, wire: Wire, status: int, kind: str, message: str) -> Response:
        return JSONResponse(wire.error(status, kind, message), status_code=status)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "sessions": len(self.router.store.sessions)})


def _internal(e: Exception) -> str:
    return f"advisor proxy: internal error: {type(e).__name__}: {e}"


async def _relay(routed: RoutedStream, events: Events) -> AsyncIterator[tuple[str, bool]]:
    """The client's stream as (events, last) pieces: each upstream delta translated as it arrives
    (the opening events go with the first, which is in already); a failure after the first byte ends
    it with an error event in the client's format (the call is booked by the router). The last piece
    goes out with the end of the response, one write fewer."""
    opening = events.start()
    try:
        async for delta in routed:
            if isinstance(delta, StreamEnd):
                yield "".join(opening + events.end(delta.response)), True
                return
            yield "".join(opening + events.delta(delta)), False
            opening = []
    except ProxyError as e:
        yield "".join(opening + events.fail(e.kind, e.message)), True
    except Exception as e:
        log.exception("advisor proxy: stream failed")
        yield "".join(opening + events.fail("api_error", _internal(e))), True


class _Reply:
    """A whole reply: status, the advisor headers, a JSON body."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    @classmethod
    def error(cls, wire: Wire, status: int, kind: str, message: str, headers: list | None = None) -> _Reply:
        return cls(status, headers or [], fastjson.dumps(wire.error(status, kind, message)))

    async def send(self, send: Send) -> None:
        length = [(b"content-length", b"%d" % len(self.body))]
        await send(
            {"type": "http.response.start", "status": self.status, "headers": _JSON + length + self.headers}
        )
        await send({"type": "http.response.body", "body": self.body})


class _Stream:
    """A relayed stream, sent as its deltas arrive; its upstream is closed however it ends: done,
    failed, or the client gone (a task watching for the disconnect cancels the relay then)."""

    def __init__(self, routed: RoutedStream, events: Events, headers: list[tuple[bytes, bytes]]):
        self.routed, self.events, self.headers = routed, events, headers

    async def send(self, send: Send, receive: Receive) -> None:
        relay = asyncio.current_task()
        assert relay is not None
        live = True
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            if live:  # the client left mid-stream (after the end, a disconnect is only the end)
                gone = True
                relay.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE + self.headers})
            last = False
            async with contextlib.aclosing(_relay(self.routed, self.events)) as pieces:
                async for piece, last in pieces:
                    if last:
                        live = False
                    await send({"type": "http.response.body", "body": piece.encode(), "more_body": not last})
                    if last:
                        break
            if not last:  # the relay ends with a last piece; this is only a guard
                live = False
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            relay.uncancel()  # the client left: nothing to send, the upstream is closed below
        finally:
            live = False
            watcher.cancel()
            await self.routed.aclose()


class _Chat:
    """The ASGI handler of one chat route (OpenAI or Anthropic wire)."""

    def __init__(self, app: ProxyApp, wire: Wire):
        self.app, self.wire = app, wire

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gate, limit = self.app.gate, self.app.config.max_request_bytes
        principal = ANYONE
        if gate.enabled:  # before the body is read: a stranger uploads nothing
            try:
                principal = await gate.admit(scope)
            except Refused as r:
                return await _refusal(self.wire, r).send(send)
            CURRENT.set(principal)
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            return await _too_large(self.wire, limit).send(send)
        message = await receive()
        raw = message.get("body", b"")
        if message.get("more_body"):
            chunks = [raw]
            size = len(raw)
            while message.get("more_body"):
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client left before its request was whole
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:  # a chunked body with no length: refused at the limit, not read on
                    return await _too_large(self.wire, limit).send(send)
                chunks.append(chunk)
            raw = b"".join(chunks)
        elif len(raw) > limit:
            return await _too_large(self.wire, limit).send(send)
        session_id = None
        for name, value in scope["headers"]:
            if name == _SESSION_HEADER:
                session_id = value.decode("latin-1")
                break
        try:
            reply = await self.app.chat(raw, session_id, self.wire, principal)
        except Exception as e:  # a bug of ours: the harness still gets its format and one line
            log.exception("advisor proxy: request failed")
            reply = _Reply.error(self.wire, 500, "api_error", _internal(e))
        if isinstance(reply, _Stream):
            await reply.send(send, receive)
        else:
            await reply.send(send)


# uvicorn's settings for the proxy: no access log, no X-Forwarded-* middleware around every request
# (the proxy reads no client address), and one socket write per reply (advisor.proxy.coalesce)
UVICORN_OPTIONS: dict[str, Any] = {
    "log_level": "warning",
    "access_log": False,
    "proxy_headers": False,
    "http": CoalescingHttpToolsProtocol,
}


def _too_large_message(limit: int) -> str:
    return f"advisor proxy: the request body is over {limit:,} bytes (max_request_bytes in proxy.yaml)"


def build_app(router: Router, gate: Gate | None = None) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    return ProxyApp(router, gate).app()
