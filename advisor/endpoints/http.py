"""What the HTTP providers share: one pooled httpx client, the API key, attempts and retries.

A provider module supplies the URL, headers and body of a call and a parser for the reply; this module
sends it, records every try as an `Attempt`, retries per `RetryPolicy`, and turns a final failure into a
one-line `EndpointError`. The API key is read from the environment variable named by
`config.api_key_env` at call time, added to each request's headers only, and scrubbed from any text
that leaves this module.

Three clients can send: httpx (the default; tests mock it with respx or a transport), aiohttp
(`http_client="aiohttp"`, when the optional `aiohttp` package is installed), whose C parser costs a
fraction of httpx's CPU per call, and `advisor.endpoints.http1` (`http_client="httptools"`: plain
http:// only, a tenth of aiohttp's CPU per call). `advisor proxy` picks the cheapest that can reach
its upstream (`preferred_client`). A reply from any of them is read as an `httpx.Response` (the
http1 one offers the same attributes), so the providers' parsers are the same for all.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import httpx

from advisor import fastjson
from advisor.endpoints.base import AttemptHook, ChatRequest, Endpoint, EndpointConfig, EndpointError
from advisor.endpoints.http1 import HTTP1Error, HTTP1Pool, HTTP1Response
from advisor.endpoints.retry import (
    AttemptFailed,
    RetryPolicy,
    Sleep,
    parse_retry_after,
    retryable_status,
    with_retries,
)
from advisor.endpoints.stream import Delta, StreamEnd
from advisor.messages import Attempt, ImagePart, Message, ModelResponse, TextPart, Usage

logger = logging.getLogger(__name__)

try:  # optional (`pip install 'advisor[proxy]'`): the cheaper client for a proxy's upstream calls
    import aiohttp
    import aiohttp.helpers
    import yarl
except ImportError:  # pragma: no cover - exercised where aiohttp is not installed
    aiohttp = None  # type: ignore[assignment]

HTTPClient = Literal["httpx", "aiohttp", "httptools"]
CLIENTS: tuple[HTTPClient, ...] = ("httpx", "aiohttp", "httptools")
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (httpx.TransportError, HTTP1Error) + (
    (aiohttp.ClientError,) if aiohttp is not None else ()
)
_CONNECTION_FAILURES = (httpx.TimeoutException, TimeoutError, *_TRANSPORT_ERRORS)
Reply = httpx.Response | HTTP1Response
# aiohttp has already decoded the body these describe
_DECODED = frozenset({"content-encoding", "content-length", "transfer-encoding"})

# 40 concurrent tasks share one endpoint in evals; leave headroom above that.
MAX_CONNECTIONS = 64
_INLINE_CHARS = 64 * 1024  # request text below this is encoded on the event loop
_MAX_REASON = 300


@dataclass
class Parsed:
    """A provider reply in neutral form."""

    message: Message
    usage: Usage
    finish_reason: str | None
    model: str


class Fold(Protocol):
    """A provider's stream parser: `feed` takes one server-sent event and returns its deltas, `done`
    says the stream has said all it will, `check_complete` raises AttemptFailed when it was cut off, and
    `reply` is the dict a non-streamed reply would have been (so one `parse` reads both)."""

    done: bool

    def feed(self, event: str | None, data: str) -> list[Delta]: ...

    def check_complete(self) -> None: ...

    def reply(self) -> dict: ...


async def sse_events(response: Reply) -> AsyncIterator[tuple[str | None, str]]:
    """(event name, data) per server-sent event; comments and id/retry fields are skipped."""
    event: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            event = line[6:].strip()
    if data:
        yield event, "\n".join(data)


def one_line(text: str, limit: int = _MAX_REASON) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_reason(response: Reply) -> str:
    """A short reason from a provider's error JSON (OpenAI, Anthropic, vLLM, FastAPI shapes), else the body."""
    try:
        data = response.json()
    except ValueError:
        return one_line(response.text or response.reason_phrase or "no body", 200)
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or err.get("msg")
            if msg:
                kind = err.get("type")
                return one_line(
                    f"{kind}: {msg}" if isinstance(kind, str) and kind not in ("error",) else msg, 200
                )
        if isinstance(err, str):
            return one_line(err, 200)
        if "detail" in data:
            return one_line(json_text(data["detail"]), 200)
    return one_line(response.text, 200)


def decode_image(data: str, media_type: str, where: str) -> ImagePart:
    """An image part from base64 text a client sent; ValueError naming `where` when it is not base64."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: the image's base64 data is invalid") from None
    return ImagePart(raw, media_type or "image/png")


def _small_text(messages: list[Message]) -> bool:
    """Only text, under _INLINE_CHARS of it."""
    chars = 0
    for m in messages:
        for p in m.content:
            if not isinstance(p, TextPart):
                return False
            chars += len(p.text)
    return chars < _INLINE_CHARS


def json_text(value) -> str:
    return value if isinstance(value, str) else repr(value)


def aiohttp_available() -> bool:
    return aiohttp is not None


def _env_proxy_for(url: str) -> bool:
    """Whether the environment's proxy variables (HTTP_PROXY, ALL_PROXY, NO_PROXY, as httpx reads
    them) send requests to `url` through a proxy."""
    proxies = urllib.request.getproxies()
    scheme, _, rest = url.partition("://")
    if not (proxies.get(scheme.lower()) or proxies.get("all")):
        return False
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    return not urllib.request.proxy_bypass(host.rsplit(":", 1)[0] if "]" not in host else host)


def preferred_client(base_url: str) -> HTTPClient:
    """The cheapest client that can reach `base_url`: httptools for plain http:// that no
    environment proxy covers (local model servers), else aiohttp when installed, else httpx."""
    if base_url.lower().startswith("http://") and not _env_proxy_for(base_url):
        return "httptools"
    return "aiohttp" if aiohttp is not None else "httpx"


class _AiohttpBody(httpx.AsyncByteStream):
    """An aiohttp reply's body, read as it arrives, as the stream of an `httpx.Response`."""

    def __init__(self, response) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.content.iter_any():
            yield chunk

    async def aclose(self) -> None:
        self._response.release()


def _as_httpx(response, content: bytes | None = None) -> httpx.Response:
    """An aiohttp reply as the `httpx.Response` the providers' parsers read (body given, or streamed)."""
    headers = [(k, v) for k, v in response.headers.items() if k.lower() not in _DECODED]
    if content is not None:
        return httpx.Response(response.status, headers=headers, content=content)
    return httpx.Response(response.status, headers=headers, stream=_AiohttpBody(response))


class HTTPEndpoint(Endpoint):
    """Base of the OpenAI and Anthropic endpoints. Keyword options are for tests and tuning:

    transport: an httpx transport (e.g. a mock); backoff_s / max_backoff_s / max_retry_after_s and
    sleep: the retry policy (`config.max_retries` sets the count); max_connections: the pool size;
    http_client: "httpx" (default), "aiohttp" (needs the aiohttp package) or "httptools" (plain
    http:// base URLs only); neither of the last two with `transport`.
    """

    default_base_url: str | None = None
    path: str  # the chat route below base_url, e.g. "/chat/completions"
    stream_fold: Callable[[], Fold]  # the provider's stream parser
    streams = False  # send() reads the reply as a stream too (OpenAI's stream=True)

    def __init__(
        self,
        name: str,
        config: EndpointConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        max_retry_after_s: float = 120.0,
        sleep: Sleep | None = None,
        max_connections: int = MAX_CONNECTIONS,
        http_client: HTTPClient = "httpx",
    ):
        super().__init__(name, config)
        if http_client not in CLIENTS:
            raise EndpointError(name, f"http_client must be httpx, aiohttp or httptools, not {http_client!r}")
        if http_client == "aiohttp" and aiohttp is None:
            raise EndpointError(
                name, "http_client aiohttp needs the aiohttp package: pip install 'advisor[proxy]'"
            )
        if http_client != "httpx" and transport is not None:
            raise EndpointError(name, f"an httpx transport cannot be used with http_client {http_client}")
        self.http_client: HTTPClient = http_client
        base = config.base_url or self.default_base_url
        if not base:
            raise EndpointError(
                name, f"{config.provider} endpoint needs base_url (e.g. http://127.0.0.1:8000/v1)"
            )
        self.base_url = base.rstrip("/")
        if http_client == "httptools" and not self.base_url.lower().startswith("http://"):
            raise EndpointError(
                name,
                f"http_client httptools takes http:// base URLs only (TLS goes through aiohttp or httpx), "
                f"not {self.base_url}",
            )
        policy = RetryPolicy(config.max_retries, backoff_s, max_backoff_s, max_retry_after_s)
        if sleep is not None:
            policy.sleep = sleep
        self.retry_policy = policy
        self._transport = transport
        self._max_connections = max_connections
        self._client: httpx.AsyncClient | None = None
        self._session = None  # aiohttp.ClientSession, made in the loop that first uses it
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._proxy: tuple = (None, None)  # (proxy URL, its auth) from the environment, for aiohttp
        self._h1: HTTP1Pool | None = None
        self._h1_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model={self.config.model!r}, base_url={self.base_url!r})"

    # -- key and client ----------------------------------------------------------------------

    def api_key(self) -> str | None:
        """The key from `config.api_key_env`, or None when the endpoint needs none (local servers)."""
        env = self.config.api_key_env
        if not env:
            return None
        key = os.environ.get(env, "").strip()
        if not key:
            raise EndpointError(
                self.name, f"environment variable {env} (api_key_env) is not set; it must hold the API key"
            )
        return key

    def client(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            self._client = httpx.AsyncClient(
                transport=self._transport,
                timeout=httpx.Timeout(self.config.timeout_s),
                limits=httpx.Limits(
                    max_connections=self._max_connections, max_keepalive_connections=self._max_connections
                ),
            )
        return self._client

    def session(self):
        """The aiohttp session (http_client aiohttp), one per event loop, like httpx's pool."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0),
                # an attempt is bounded by asyncio.timeout; each read of a stream by sock_read, as httpx's
                timeout=aiohttp.ClientTimeout(total=None, sock_read=self.config.timeout_s),
                cookie_jar=aiohttp.DummyCookieJar(),  # as stateless as the httpx client's use here
            )
            self._session_loop = loop
            # proxy variables from the environment, as httpx reads them; looked up once here, since
            # aiohttp's trust_env does it in a worker thread at every request
            try:
                self._proxy = aiohttp.helpers.get_env_proxy_for_url(yarl.URL(self.base_url))
            except LookupError:
                self._proxy = (None, None)
        return self._session

    def h1(self) -> HTTP1Pool:
        """The http1 pool (http_client httptools), one per event loop."""
        loop = asyncio.get_running_loop()
        if self._h1 is None or self._h1.closed or self._h1_loop is not loop:
            self._h1 = HTTP1Pool(self.base_url, self._max_connections)
            self._h1_loop = loop
        return self._h1

    async def aclose(self) -> None:
        if self._h1 is not None:
            self._h1.close()
            self._h1 = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._session is not None:
            session, self._session = self._session, None
            if self._session_loop is asyncio.get_running_loop():
                await session.close()

    # -- sending -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.base_url + self.path

    def build_body(self, request: ChatRequest, stream: bool = False) -> dict:
        raise NotImplementedError

    def headers(self) -> dict[str, str]:
        raise NotImplementedError

    def _parser(self, request: ChatRequest, body: dict) -> Callable[[dict], Parsed]:
        raise NotImplementedError

    async def send(self, request: ChatRequest, on_attempt: AttemptHook | None) -> ModelResponse:
        body, payload = await self.prepare(request)
        fold = self.stream_fold if self.streams else None
        return await self.post(
            self.url, self.headers(), payload, self._parser(request, body), on_attempt, fold
        )

    async def send_stream(self, request: ChatRequest, on_attempt: AttemptHook | None) -> AsyncIterator[Delta]:
        body, payload = await self.prepare(request, stream=True)
        parse = self._parser(request, body)
        async for delta in self.post_stream(
            self.url, self.headers(), payload, parse, self.stream_fold, on_attempt
        ):
            yield delta

    async def prepare(self, request: ChatRequest, stream: bool = False) -> tuple[dict, bytes]:
        """Build the request body (a streamed one when `stream`) and encode it, in a worker thread when it
        holds images or much text: images make it megabytes of base64, which must not be encoded on the
        event loop."""

        def build() -> tuple[dict, bytes]:
            body = self.build_body(request, stream)
            try:  # a NaN here must be refused, not sent as null
                data = fastjson.dumps_finite(body)
            except (TypeError, ValueError) as e:
                raise EndpointError(self.name, one_line(f"request body is not valid JSON: {e}")) from None
            return body, data

        # a small text-only body encodes in microseconds: a thread hop would cost more than it saves
        if _small_text(request.messages):
            return build()
        return await asyncio.to_thread(build)

    async def _send(self, url: str, payload: bytes, headers: dict[str, str], stream: bool) -> Reply:
        """POST on the endpoint's client; a streamed response must be closed (`aclose`) by the caller."""
        headers = {**headers, "Content-Type": "application/json"}
        if self.http_client == "httptools":
            reply = await self.h1().request("POST", url, headers, payload, self.config.timeout_s)
            if not stream:
                try:
                    await reply.aread()
                finally:
                    await reply.aclose()
            return reply
        if self.http_client == "aiohttp":
            session = self.session()
            proxy, proxy_auth = self._proxy
            r = await session.post(url, data=payload, headers=headers, proxy=proxy, proxy_auth=proxy_auth)
            if stream:
                return _as_httpx(r)
            try:
                return _as_httpx(r, await r.read())
            finally:
                r.release()
        client = self.client()
        if not stream:
            return await client.post(url, content=payload, headers=headers)
        return await client.send(
            client.build_request("POST", url, content=payload, headers=headers), stream=True
        )

    async def post(
        self,
        url: str,
        headers: dict[str, str],
        payload: bytes,
        parse: Callable[[dict], Parsed],
        on_attempt: AttemptHook | None,
        fold: Callable[[], Fold] | None = None,
    ) -> ModelResponse:
        """POST the JSON `payload` with retries; `parse` turns a 2xx JSON body into `Parsed` (or raises
        AttemptFailed). `timeout_s` bounds each attempt as a whole, not only each socket read.

        With `fold`, the reply is streamed and read whole by a new `fold()` per attempt into the dict a
        non-streaming reply would have been, so `parse` is the same either way (a stream cut off is
        retried: nothing of it has left this call)."""
        log = _AttemptLog(self, on_attempt)
        scrub, record = log.scrub, log.record

        async def fetch() -> tuple[Reply, dict | None]:
            if fold is None:
                return await self._send(url, payload, headers, stream=False), None
            response = await self._send(url, payload, headers, stream=True)
            try:
                if response.status_code >= 400:
                    await response.aread()
                    return response, None
                reader = fold()
                async for event, data in sse_events(response):
                    reader.feed(event, data)
                    if reader.done:
                        break
                reader.check_complete()
                return response, reader.reply()
            finally:
                await response.aclose()

        async def once() -> Parsed:
            number = log.next_number
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    response, streamed = await fetch()
            except _CONNECTION_FAILURES as e:
                raise log.connection_failed(e, t0) from None
            except AttemptFailed as e:  # a stream that broke its own format
                e.reason = scrub(e.reason)
                record(Attempt(number, False, 200, e.reason, None, time.perf_counter() - t0))
                raise
            latency = time.perf_counter() - t0
            status = response.status_code
            if status >= 400:
                retry_after = parse_retry_after(response.headers)
                reason = scrub(f"HTTP {status}: {error_reason(response)}")
                record(Attempt(number, False, status, reason, retry_after, latency))
                raise AttemptFailed(
                    reason, status=status, retry_after=retry_after, retryable=retryable_status(status)
                )
            try:
                data = streamed if streamed is not None else fastjson.loads(response.content)
                if not isinstance(data, dict):
                    raise AttemptFailed(
                        f"invalid response: expected a JSON object, got {type(data).__name__}",
                        retryable=False,
                    )
                parsed = parse(data)
            except AttemptFailed as e:
                e.reason = scrub(e.reason)
                record(Attempt(number, False, status, e.reason, e.retry_after, latency))
                raise
            except (ValueError, KeyError, TypeError, IndexError) as e:
                reason = scrub(f"invalid response ({type(e).__name__}: {e})")
                record(Attempt(number, False, status, reason, None, latency))
                raise AttemptFailed(reason, status=status, retryable=False) from None
            record(Attempt(number, True, status, None, None, latency, parsed.usage))
            return parsed

        try:
            parsed = await with_retries(once, self.retry_policy, self._say_retry)
        except AttemptFailed as e:
            raise self._final_error(e, log.attempts) from None
        return log.response(parsed)

    def _say_retry(self, e: AttemptFailed, retry: int, wait_s: float) -> None:
        """One warning line per retry (the run's progress shows it): without it a dead URL is a run that
        says nothing for the whole backoff. The reason is already scrubbed of keys."""
        logger.warning(
            "endpoint %s: %s; retry %d of %d in %.1f s",
            self.name, one_line(e.reason), retry, self.retry_policy.max_retries, wait_s,
        )

    def _final_error(self, e: AttemptFailed, attempts: list[Attempt]) -> EndpointError:
        message = e.reason
        if len(attempts) > 1:
            message += f" (after {len(attempts)} attempts)"
        elif (
            e.retryable and e.retry_after is not None and e.retry_after > self.retry_policy.max_retry_after_s
        ):
            message += f" (Retry-After {e.retry_after:g}s exceeds the {self.retry_policy.max_retry_after_s:g}s limit)"
        return EndpointError(self.name, one_line(message), attempts, e.status)

    async def post_stream(
        self,
        url: str,
        headers: dict[str, str],
        payload: bytes,
        parse: Callable[[dict], Parsed],
        fold: Callable[[], Fold],
        on_attempt: AttemptHook | None,
    ) -> AsyncIterator[Delta]:
        """POST the JSON `payload` of a streamed request and yield the reply's deltas as they arrive, then
        a `StreamEnd` with the whole `ModelResponse` (`parse` reads `fold().reply()`).

        Retries (per `RetryPolicy`) happen only until the first delta: `timeout_s` bounds an attempt up
        to it, and each read after it. Once a delta is out, a failure is final: the attempt is recorded
        with the usage of what was streamed (the provider's when it sent any, else an estimate) and an
        `EndpointError` is raised. Closing the generator (a consumer that went away) closes the upstream
        response and records the attempt as cancelled, with the same usage."""
        log = _AttemptLog(self, on_attempt)
        scrub, record, attempts = log.scrub, log.record, log.attempts

        async def open_stream() -> tuple[Reply, AsyncIterator, Fold, list[Delta], float]:
            number = log.next_number
            t0 = time.perf_counter()
            response: Reply | None = None
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    response = await self._send(url, payload, headers, stream=True)
                    if response.status_code >= 400:
                        await response.aread()
                        status = response.status_code
                        retry_after = parse_retry_after(response.headers)
                        reason = scrub(f"HTTP {status}: {error_reason(response)}")
                        record(Attempt(number, False, status, reason, retry_after, time.perf_counter() - t0))
                        raise AttemptFailed(
                            reason, status=status, retry_after=retry_after, retryable=retryable_status(status)
                        )
                    events = sse_events(response)
                    reader = fold()
                    first: list[Delta] = []
                    while not first and not reader.done:  # pings, role-only chunks: no delta yet
                        item = await anext(events, None)
                        if item is None:
                            break
                        first = reader.feed(*item)
                    if not first:  # it ended before any delta: read it whole, as a reply
                        reader.check_complete()
                        try:
                            parse(reader.reply())  # an error in a 200 reply raises (and may retry)
                        except (ValueError, KeyError, TypeError, IndexError) as e:
                            raise AttemptFailed(
                                f"invalid response ({type(e).__name__}: {e})", retryable=False
                            ) from None
                    return response, events, reader, first, t0
            except _CONNECTION_FAILURES as e:
                failure = log.connection_failed(e, t0)
            except AttemptFailed as e:
                if not attempts or attempts[-1].number != number:
                    e.reason = scrub(e.reason)
                    record(Attempt(number, False, 200, e.reason, e.retry_after, time.perf_counter() - t0))
                failure = e
            except BaseException:
                if response is not None:
                    await response.aclose()
                raise
            if response is not None:
                await response.aclose()
            raise failure

        try:
            response, events, reader, first, t0 = await with_retries(
                open_stream, self.retry_policy, self._say_retry
            )
        except AttemptFailed as e:
            raise self._final_error(e, attempts) from None
        number = log.next_number

        def partial_usage() -> Usage | None:
            try:
                return parse(reader.reply()).usage
            except Exception:  # a reply too broken to read bills nothing we can count
                return None

        try:
            for delta in first:
                yield delta
            while not reader.done:
                item = await anext(events, None)
                if item is None:
                    break
                for delta in reader.feed(*item):
                    yield delta
            reader.check_complete()
            parsed = parse(reader.reply())
        except (
            AttemptFailed,
            *_TRANSPORT_ERRORS,
            httpx.TimeoutException,
            TimeoutError,
            ValueError,
            KeyError,
            TypeError,
        ) as e:
            reason = e.reason if isinstance(e, AttemptFailed) else f"{type(e).__name__}: {e}"
            if isinstance(e, (httpx.TimeoutException, TimeoutError)):
                reason = f"timeout after {self.config.timeout_s:g}s between stream reads"
            reason = scrub(f"stream broke off after its first delta: {reason}")
            record(Attempt(number, False, 200, reason, None, time.perf_counter() - t0, partial_usage()))
            raise EndpointError(self.name, reason, attempts, getattr(e, "status", None)) from None
        except BaseException:  # cancelled, or the consumer closed the stream: the upstream goes too
            record(
                Attempt(
                    number,
                    False,
                    200,
                    "cancelled mid-stream",
                    None,
                    time.perf_counter() - t0,
                    partial_usage(),
                )
            )
            raise
        finally:
            await response.aclose()
        record(Attempt(number, True, 200, None, None, time.perf_counter() - t0, parsed.usage))
        yield StreamEnd(log.response(parsed))


class _AttemptLog:
    """One call's tries: numbered in order, their reasons scrubbed of the API key, each passed to the
    caller's hook as it is recorded and all of them kept for the final reply or error."""

    def __init__(self, endpoint: HTTPEndpoint, on_attempt: AttemptHook | None):
        self.scrub = _Scrubber(endpoint.api_key() if endpoint.config.api_key_env else None)
        self.attempts: list[Attempt] = []
        self._on_attempt = on_attempt
        self._timeout_s = endpoint.config.timeout_s
        self._model = endpoint.config.model
        self._start = time.perf_counter()

    @property
    def next_number(self) -> int:
        return len(self.attempts) + 1

    def record(self, attempt: Attempt) -> None:
        self.attempts.append(attempt)
        if self._on_attempt is not None:
            self._on_attempt(attempt)

    def connection_failed(self, e: BaseException, t0: float) -> AttemptFailed:
        """Record a try that got no reply (a timeout or a transport error, one of _CONNECTION_FAILURES)
        and return the retryable failure to raise for it."""
        if isinstance(e, (httpx.TimeoutException, TimeoutError)):
            reason = f"timeout after {self._timeout_s:g}s ({type(e).__name__})"
        else:
            reason = self.scrub(f"connection error: {type(e).__name__}: {e}")
        self.record(Attempt(self.next_number, False, error=reason, latency_s=time.perf_counter() - t0))
        return AttemptFailed(reason)

    def response(self, parsed: Parsed) -> ModelResponse:
        return ModelResponse(
            message=parsed.message,
            usage=parsed.usage,
            model=parsed.model or self._model,
            finish_reason=parsed.finish_reason,
            latency_s=time.perf_counter() - self._start,
            attempts=self.attempts,
        )


class _Scrubber:
    """Removes the API key from any text that could leave the endpoint."""

    def __init__(self, key: str | None):
        self.key = key

    def __call__(self, text: str) -> str:
        if self.key and self.key in text:
            text = text.replace(self.key, "***")
        return one_line(text)
