"""`ScriptedServer`: a real HTTP server (starlette on uvicorn) on 127.0.0.1, run in a background thread,
answering each request for a model with the next turn of that model's script. What it does is the same
on every route: record the request (secrets redacted), take the model's next turn, resolve it (delays,
callables), and hand the result to the route's wire format (`advisor.testing.openai`,
`advisor.testing.anthropic`) to render.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from advisor.endpoints.base import EndpointConfig
from advisor.testing.anthropic import ANTHROPIC
from advisor.testing.openai import OPENAI
from advisor.testing.script import (
    Delay,
    HTTPError,
    RecordedRequest,
    Reply,
    Script,
    StreamEvent,
    Turn,
    WireFormat,
    sha256_hex,
)

_SECRET_HEADERS = ("authorization", "x-api-key", "api-key")
WIRE_FORMATS = (OPENAI, ANTHROPIC)
CALLABLE_THREADS = 64  # callable turns answered at once


class ScriptedServer:
    """A real OpenAI/Anthropic-compatible HTTP server on 127.0.0.1, answering from per-model scripts.

    Use as a context manager (or call `start()` / `stop()`); see `advisor.testing`'s docstring.
    """

    def __init__(self, scripts: dict[str, Script] | None = None, *, host: str = "127.0.0.1"):
        self._lock = threading.Lock()
        self._scripts: dict[str, Script] = {}
        self._served: dict[str, int] = {}
        self._requests: list[RecordedRequest] = []
        self._in_flight: dict[str | None, int] = {}
        self._peak: dict[str | None, int] = {}
        self._ids = itertools.count(1)
        # callable turns run here: one that waits on the test (an event it sets) holds a thread, and the
        # loop's default pool (a few threads on a small machine) would queue the rest behind it
        self._callables = ThreadPoolExecutor(max_workers=CALLABLE_THREADS, thread_name_prefix="scripted-turn")
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the server thread's loop, once it has one
        self._closed: asyncio.Event | None = None  # set on stop(); ends pending scripted delays
        self.host = host
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        for model, script in (scripts or {}).items():
            self.script(model, script)

    # -- scripting ---------------------------------------------------------------------------

    def script(self, model: str, script: Script) -> None:
        """Set (replace) the script for `model`."""
        with self._lock:
            self._scripts[model] = script if callable(script) else list(script)
            self._served.setdefault(model, 0)

    def add_turns(self, model: str, *turns: Turn) -> None:
        """Append turns to a model's list script (creating it when absent)."""
        with self._lock:
            current = self._scripts.setdefault(model, [])
            if callable(current):
                raise TypeError(f"script for model '{model}' is a callable; use script() to replace it")
            current.extend(turns)
            self._served.setdefault(model, 0)

    def remaining(self, model: str) -> int:
        """Turns left in a model's list script (-1 for a callable script)."""
        with self._lock:
            script = self._scripts.get(model, [])
            return -1 if callable(script) else len(script)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, model: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.model == model]

    def in_flight(self, model: str) -> int:
        """Requests for `model` being answered now (received, reply not yet sent to the end)."""
        with self._lock:
            return self._in_flight.get(model, 0)

    def peak_in_flight(self, model: str) -> int:
        """The most requests for `model` this server was answering at once."""
        with self._lock:
            return self._peak.get(model, 0)

    def _enter(self, model: str | None) -> None:
        with self._lock:
            n = self._in_flight.get(model, 0) + 1
            self._in_flight[model] = n
            self._peak[model] = max(self._peak.get(model, 0), n)

    def _leave(self, model: str | None) -> None:
        with self._lock:
            self._in_flight[model] -= 1

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def root_url(self) -> str:
        if self.port is None:
            raise RuntimeError("ScriptedServer is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """Base URL for an OpenAI-compatible client (ends in /v1)."""
        return f"{self.root_url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """Base URL for an Anthropic client (it appends /v1/messages itself)."""
        return self.root_url

    def endpoint_config(self, model: str, provider: str = "openai", **fields: Any) -> EndpointConfig:
        """An `EndpointConfig` pointing at this server (free unless `price` is given; no retries wait long)."""
        base = self.base_url if provider == "openai" else self.anthropic_base_url
        if "price" not in fields:
            fields.setdefault("free", True)
        return EndpointConfig(provider=provider, model=model, base_url=base, **fields)

    def start(self) -> ScriptedServer:
        if self._thread is not None:
            return self
        self._callables = ThreadPoolExecutor(max_workers=CALLABLE_THREADS, thread_name_prefix="scripted-turn")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app(),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="scripted-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("ScriptedServer failed to start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._closing = True
        if self._loop is not None and self._closed is not None:
            self._loop.call_soon_threadsafe(self._closed.set)
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server = None
        self._thread = None
        self._callables.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def __aenter__(self) -> ScriptedServer:
        # starting only spawns a thread and waits for its socket: brief, but keep it off the loop
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.stop)

    # -- the app ---------------------------------------------------------------------------

    def _app(self) -> Starlette:
        return Starlette(
            routes=[
                *(Route(wire.path, self._handler(wire), methods=["POST"]) for wire in WIRE_FORMATS),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    def _handler(self, wire: WireFormat):
        async def handle(request: Request) -> Response:
            rec, turn, body = await self._turn_for(request, wire)
            try:
                if isinstance(turn, HTTPError):
                    return wire.error(turn)
                if body.get("stream"):
                    events = wire.stream(turn, body, next(self._ids))
                    streamed = self._paced(rec, turn, events)
                    rec = None  # counted in flight until the stream ends
                    return StreamingResponse(streamed, media_type="text/event-stream")
                return wire.reply(turn, body, next(self._ids))
            finally:
                if rec is not None:
                    self._leave(rec.model)

        return handle

    async def _models(self, request: Request) -> JSONResponse:
        with self._lock:
            names = sorted(self._scripts)
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model"} for m in names]})

    async def _record(self, request: Request) -> tuple[RecordedRequest, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
        headers: dict[str, str] = {}
        auth = None
        for k, v in request.headers.items():
            if k.lower() in _SECRET_HEADERS:
                headers[k] = "<redacted>"
                auth = sha256_hex(v)
            else:
                headers[k] = v
        model = body.get("model") if isinstance(body, dict) else None
        rec = RecordedRequest(request.url.path, model, body, headers, auth, time.time())
        with self._lock:
            self._requests.append(rec)
        self._enter(model)
        return rec, body

    def _next_turn(self, model: str | None, body: dict) -> Any:
        with self._lock:
            if model not in self._scripts:
                return HTTPError(404, f"model '{model}' is not scripted on this server")
            script = self._scripts[model]
            self._served[model] += 1
            if callable(script):
                turn = script
            elif not script:
                return HTTPError(
                    400, f"script for model '{model}' is exhausted after {self._served[model] - 1} requests"
                )
            else:
                turn = script.pop(0)
        return turn

    async def _resolve(self, turn: Any, body: dict) -> Any:
        # callables and delays may nest (Delay(then=fn)); resolve until a Reply or HTTPError
        while True:
            if isinstance(turn, str):
                return Reply(text=turn)
            if isinstance(turn, (Reply, HTTPError)):
                if isinstance(turn, Reply) and turn.delay_s:
                    await self._sleep(turn.delay_s)
                return turn
            if isinstance(turn, Delay):
                await self._sleep(turn.seconds)
                turn = (
                    turn.then
                    if turn.then is not None
                    else HTTPError(504, "scripted delay ended without a reply")
                )
                continue
            if callable(turn):
                turn = await asyncio.get_running_loop().run_in_executor(self._callables, turn, body)
                continue
            raise TypeError(f"not a scripted turn: {turn!r}")

    async def _sleep(self, seconds: float) -> None:
        # wait on an event that stop() sets, so stop() never waits out a long scripted delay
        if self._closed is None:
            self._loop, self._closed = asyncio.get_running_loop(), asyncio.Event()
        if self._closing:
            return
        try:
            await asyncio.wait_for(self._closed.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _turn_for(self, request: Request, wire: WireFormat) -> tuple[RecordedRequest, Any, Any]:
        rec, body = await self._record(request)
        if not isinstance(body, dict):
            return rec, HTTPError(400, "request body is not a JSON object"), body
        refusal = wire.refuse(body)
        if refusal is not None:
            return rec, refusal, body
        try:
            turn = await self._resolve(self._next_turn(rec.model, body), body)
        except Exception as e:  # a broken callable turn is a test bug: say so in the response
            turn = HTTPError(400, f"scripted turn raised {type(e).__name__}: {e}")
        return rec, turn, body

    async def _paced(self, rec: RecordedRequest, turn: Reply, events: list[StreamEvent]):
        """A streamed reply's events, paced as the turn says (chunk_delay_s, hold, cut_after); how the
        stream ended goes in `rec.stream_outcome`."""
        try:
            for i, event in enumerate(events):
                if i and turn.chunk_delay_s:
                    await self._sleep(turn.chunk_delay_s)
                if event.delta and turn.cut_after is not None and rec.deltas_sent >= turn.cut_after:
                    rec.stream_outcome = "cut"
                    return
                yield event.text
                if event.delta:
                    rec.deltas_sent += 1
                    if rec.deltas_sent == 1 and turn.hold is not None and not await self._held(turn):
                        rec.stream_outcome = "cut"
                        return
            rec.stream_outcome = "complete"
        except BaseException:  # cancelled: the client closed the connection mid-stream
            rec.stream_outcome = "client left"
            raise
        finally:
            self._leave(rec.model)

    async def _held(self, turn: Reply) -> bool:
        # polled, not waited in a thread: a client that leaves cancels this at once
        assert turn.hold is not None
        deadline = time.monotonic() + turn.hold_s
        while not turn.hold.is_set():
            if self._closing or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True
