"""A scripted, local, OpenAI- and Anthropic-compatible model server for tests and demos.

`ScriptedServer` is a real HTTP server (starlette on uvicorn) bound to 127.0.0.1 on a free port, run in
a background thread, so sync and async tests can both talk to it over real sockets. What it answers
is scripted per model name: each request for a model takes the next turn of that model's script.

    from advisor.testing import HTTPError, Delay, Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage

    scripts = {
        "flash": [
            HTTPError(429, retry_after=0.01),                      # rate limited once
            Reply(tool_calls=[ScriptedToolCall("crop", {"box": [0, 0, 10, 10]})],
                  usage=ScriptedUsage(prompt_tokens=120, completion_tokens=30,
                                      cached_tokens=100, reasoning_tokens=12)),
            Reply(tool_calls=[ScriptedToolCall("crop", '{"box": [0, 0')]),   # malformed arguments
            Delay(5.0),                                            # hangs: lets a client time out
            "the total is 42.17",                                  # a str is Reply(text=...)
        ],
        # a callable turn sees the request JSON and returns a turn: reply depending on the messages
        "frontier": [lambda req: Reply(text="advice: crop the bottom third first")],
    }
    with ScriptedServer(scripts) as server:
        server.base_url            # "http://127.0.0.1:PORT/v1"  (OpenAI provider base_url)
        server.anthropic_base_url  # "http://127.0.0.1:PORT"     (Anthropic provider base_url)
        ...                        # run the code under test
        server.requests            # every request received, in order (RecordedRequest)
        server.requests_for("flash")[0].body["tools"]
        server.endpoint_config("flash")               # EndpointConfig(provider="openai", free=True, ...)
        server.endpoint_config("claude", "anthropic", price=Price(input=3, output=15))

Routes: `POST /v1/chat/completions` (OpenAI chat completions; `stream: true` is answered with
server-sent events, text and arguments split over chunks, usage last when
`stream_options.include_usage`), `POST /v1/messages` (Anthropic Messages, not streamed),
`GET /v1/models`. Both POST routes share the scripts; the reply is rendered in the route's wire format
(Anthropic: thinking/text/tool_use blocks, `stop_reason`, `input_tokens` etc.).

A script is either a list of turns (each request consumes one; when the list is used up the server
answers HTTP 400 with "script for model ... is exhausted", which endpoints do not retry) or a single
callable `fn(request_json) -> turn` that answers every request. A turn is:

- `Reply(text=..., tool_calls=[...], reasoning=..., usage=..., finish_reason=..., delay_s=...)`;
  `usage=None` omits usage from the response (clients must then estimate); the default usage is
  `ScriptedUsage(prompt_tokens=100, completion_tokens=20)`.
- `ScriptedToolCall(name, arguments)`: `arguments` is a dict (sent as a JSON string), or a str sent
  verbatim (use it for malformed JSON). On the Anthropic route a str is parsed when it is valid JSON,
  else sent as the raw string in `input` (which a client must reject as not an object).
- `HTTPError(status, message="", retry_after=None)`: an error response in the provider's error JSON;
  `retry_after` (seconds, or a str such as an HTTP date) becomes the `Retry-After` header.
- `Delay(seconds, then=None)`: wait, then answer `then` (or, when None, HTTP 504). Use it to make a
  client time out; pending delays end at once when the server stops.
- a plain `str`: shorthand for `Reply(text=...)`; a callable: called (in a worker thread) with the
  request JSON, returns one of the above.

`server.script(model, script)` replaces a script, `server.add_turns(model, *turns)` appends, and
`server.remaining(model)` counts what is left (-1 for a callable script).

Secrets: request headers are recorded with `Authorization`, `x-api-key` and `api-key` replaced by
"<redacted>"; `RecordedRequest.auth_sha256` holds a SHA-256 of the credential so a test can check
`req.auth_is("sk-...")` without the server keeping the key. Nothing is logged (uvicorn access log off).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from advisor.endpoints.base import EndpointConfig

__all__ = [
    "Delay",
    "HTTPError",
    "RecordedRequest",
    "Reply",
    "ScriptedServer",
    "ScriptedToolCall",
    "ScriptedUsage",
]

_SECRET_HEADERS = ("authorization", "x-api-key", "api-key")


@dataclass
class ScriptedUsage:
    """Token counts of a scripted reply, in OpenAI terms (totals include the details).

    prompt_tokens: all prompt tokens, cached ones included.
    cached_tokens: prompt tokens read from cache (OpenAI prompt_tokens_details.cached_tokens,
        Anthropic cache_read_input_tokens).
    cache_write_tokens: prompt tokens written to cache (Anthropic cache_creation_input_tokens only).
    completion_tokens: all completion tokens, reasoning included.
    reasoning_tokens: OpenAI completion_tokens_details.reasoning_tokens (Anthropic has no such split).
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0

    def openai(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }

    def anthropic(self) -> dict:
        return {
            "input_tokens": max(0, self.prompt_tokens - self.cached_tokens - self.cache_write_tokens),
            "cache_read_input_tokens": self.cached_tokens,
            "cache_creation_input_tokens": self.cache_write_tokens,
            "output_tokens": self.completion_tokens,
        }


@dataclass
class ScriptedToolCall:
    name: str
    arguments: dict | str = field(default_factory=dict)
    id: str | None = None  # generated (call_N) when None


def _default_usage() -> ScriptedUsage:
    return ScriptedUsage(prompt_tokens=100, completion_tokens=20)


@dataclass
class Reply:
    text: str | None = None
    tool_calls: list[ScriptedToolCall] = field(default_factory=list)
    reasoning: str | None = None  # OpenAI: message.reasoning_content; Anthropic: a thinking block
    usage: ScriptedUsage | None = field(default_factory=_default_usage)  # None: no usage in the response
    finish_reason: str | None = None  # default: "tool_calls" when there are tool calls, else "stop"
    delay_s: float = 0.0


@dataclass
class HTTPError:
    status: int
    message: str = ""
    retry_after: float | str | None = None


@dataclass
class Delay:
    seconds: float
    then: Any = None  # a turn answered after the delay; None -> HTTP 504


Turn = Reply | HTTPError | Delay | str | Callable[[dict], Any]
Script = list[Turn] | Callable[[dict], Any]


@dataclass
class RecordedRequest:
    """One request the server received. Secret headers are redacted; see `auth_is`."""

    path: str
    model: str | None
    body: Any
    headers: dict[str, str]
    auth_sha256: str | None = None  # SHA-256 of the Authorization / x-api-key value, when one was sent
    time: float = 0.0

    @property
    def has_auth(self) -> bool:
        return self.auth_sha256 is not None

    def auth_is(self, key: str) -> bool:
        """True when the credential sent was `key` (as `Bearer key` or a bare x-api-key)."""
        if self.auth_sha256 is None:
            return False
        return self.auth_sha256 in (_sha(key), _sha(f"Bearer {key}"))


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


class ScriptedServer:
    """A real OpenAI/Anthropic-compatible HTTP server on 127.0.0.1, answering from per-model scripts.

    Use as a context manager (or call `start()` / `stop()`); see the module docstring.
    """

    def __init__(self, scripts: dict[str, Script] | None = None, *, host: str = "127.0.0.1"):
        self._lock = threading.Lock()
        self._scripts: dict[str, Script] = {}
        self._served: dict[str, int] = {}
        self._requests: list[RecordedRequest] = []
        self._ids = itertools.count(1)
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
                Route("/v1/chat/completions", self._openai, methods=["POST"]),
                Route("/v1/messages", self._anthropic, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

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
                auth = _sha(v)
            else:
                headers[k] = v
        model = body.get("model") if isinstance(body, dict) else None
        rec = RecordedRequest(request.url.path, model, body, headers, auth, time.time())
        with self._lock:
            self._requests.append(rec)
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
                turn = await asyncio.to_thread(turn, body)
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

    async def _turn_for(self, request: Request) -> tuple[Any, Any]:
        rec, body = await self._record(request)
        if not isinstance(body, dict):
            return HTTPError(400, "request body is not a JSON object"), body
        if body.get("stream") and request.url.path.endswith("/messages"):
            return HTTPError(400, "ScriptedServer does not stream Anthropic replies"), body
        try:
            turn = await self._resolve(self._next_turn(rec.model, body), body)
        except Exception as e:  # a broken callable turn is a test bug: say so in the response
            turn = HTTPError(400, f"scripted turn raised {type(e).__name__}: {e}")
        return turn, body

    @staticmethod
    def _error_headers(err: HTTPError) -> dict[str, str]:
        return {} if err.retry_after is None else {"Retry-After": str(err.retry_after)}

    async def _openai(self, request: Request) -> JSONResponse | StreamingResponse:
        turn, body = await self._turn_for(request)
        if isinstance(turn, HTTPError):
            kind = {429: "rate_limit_error", 401: "authentication_error"}.get(
                turn.status, "api_error" if turn.status >= 500 else "invalid_request_error"
            )
            payload = {
                "error": {
                    "message": turn.message or f"scripted HTTP {turn.status}",
                    "type": kind,
                    "code": turn.status,
                }
            }
            return JSONResponse(payload, status_code=turn.status, headers=self._error_headers(turn))
        n = next(self._ids)
        message: dict[str, Any] = {"role": "assistant", "content": turn.text}
        if turn.reasoning is not None:
            message["reasoning_content"] = turn.reasoning
        if turn.tool_calls:
            message["tool_calls"] = [
                {
                    "id": tc.id or f"call_{n}_{i}",
                    "type": "function",
                    "function": {
                        "name": tc.name,
                        "arguments": tc.arguments
                        if isinstance(tc.arguments, str)
                        else json.dumps(tc.arguments),
                    },
                }
                for i, tc in enumerate(turn.tool_calls)
            ]
        finish = turn.finish_reason or ("tool_calls" if turn.tool_calls else "stop")
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = _openai_chunks(
                f"chatcmpl-{n}", body.get("model"), message, finish, turn.usage, include_usage
            )
            return StreamingResponse(_sse(chunks), media_type="text/event-stream")
        payload = {
            "id": f"chatcmpl-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        }
        if turn.usage is not None:
            payload["usage"] = turn.usage.openai()
        return JSONResponse(payload)

    async def _anthropic(self, request: Request) -> JSONResponse:
        turn, body = await self._turn_for(request)
        if isinstance(turn, HTTPError):
            kind = {429: "rate_limit_error", 401: "authentication_error", 529: "overloaded_error"}.get(
                turn.status, "api_error" if turn.status >= 500 else "invalid_request_error"
            )
            payload = {
                "type": "error",
                "error": {"type": kind, "message": turn.message or f"scripted HTTP {turn.status}"},
            }
            return JSONResponse(payload, status_code=turn.status, headers=self._error_headers(turn))
        n = next(self._ids)
        content: list[dict] = []
        if turn.reasoning is not None:
            content.append({"type": "thinking", "thinking": turn.reasoning, "signature": f"sig-{n}"})
        if turn.text:
            content.append({"type": "text", "text": turn.text})
        for i, tc in enumerate(turn.tool_calls):
            args: Any = tc.arguments
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    pass  # sent verbatim: the client must reject a non-object input
            content.append(
                {"type": "tool_use", "id": tc.id or f"toolu_{n}_{i}", "name": tc.name, "input": args}
            )
        stop = {"tool_calls": "tool_use", "stop": "end_turn", "length": "max_tokens"}
        finish = turn.finish_reason or ("tool_calls" if turn.tool_calls else "stop")
        payload = {
            "id": f"msg_{n}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model"),
            "content": content,
            "stop_reason": stop.get(finish, finish),
            "stop_sequence": None,
        }
        if turn.usage is not None:
            payload["usage"] = turn.usage.anthropic()
        return JSONResponse(payload)


def _halves(text: str) -> list[str]:
    mid = len(text) // 2
    return [x for x in (text[:mid], text[mid:]) if x]


def _openai_chunks(
    cid: str, model: str | None, message: dict, finish: str, usage: ScriptedUsage | None, include_usage: bool
) -> list[dict]:
    """A reply as OpenAI stream chunks, each text and tool-call argument split across two chunks."""
    deltas: list[dict] = [{"role": "assistant"}]
    deltas += [{"reasoning_content": part} for part in _halves(message.get("reasoning_content") or "")]
    deltas += [{"content": part} for part in _halves(message.get("content") or "")]
    for i, call in enumerate(message.get("tool_calls", [])):
        fn = call["function"]
        first, *rest = _halves(fn["arguments"]) or [""]
        deltas.append(
            {
                "tool_calls": [
                    {
                        "index": i,
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": fn["name"], "arguments": first},
                    }
                ]
            }
        )
        deltas += [{"tool_calls": [{"index": i, "function": {"arguments": part}}]} for part in rest]
    base = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    chunks = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if include_usage and usage is not None:
        chunks.append({**base, "choices": [], "usage": usage.openai()})
    return chunks


async def _sse(chunks: list[dict]):
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"
