"""A small HTTP/1.1 client for the endpoints' POSTs to plain-http servers: keep-alive connections on
asyncio protocols, replies parsed by httptools (the C parser uvicorn runs on).

Why it exists: a proxy in front of a local model server (vLLM, SGLang, llama.cpp, `advisor serve`)
spends most of its CPU per request in the HTTP client. aiohttp's client costs about 0.4 ms of CPU per
call on the development machine, httpx's more; this one about a tenth of that, because a call is one
write of precomputed bytes and one parse in C, with no per-request objects beyond the reply.

What it does: POST (or any method) with a bytes body to an `http://` URL; replies with a
content-length, chunked, or read-until-close body, `gzip` / `deflate` decoded (it asks for `identity`);
1xx interim replies skipped. A connection is reused when the server keeps it alive; a reused one that
the server closed before answering is replaced once at once (the race every keep-alive client has).
Cancelling a call closes its connection. What it leaves to aiohttp or httpx: TLS, proxies from the
environment, HTTP/2 (`HTTPEndpoint` picks this client only for plain-http URLs that no proxy covers).

The reply offers what `advisor.endpoints.http` reads of an `httpx.Response`: `status_code`,
`headers` (lower-case names), `reason_phrase`, `aread()` / `content` / `text` / `json()`,
`aiter_bytes()` / `aiter_lines()` (the latter as httpx splits lines) and `aclose()`.
"""

from __future__ import annotations

import asyncio
import codecs
import zlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httptools

from advisor import fastjson

_PAUSE_AT = 1 << 20  # a streamed reply's unread bytes above which the socket stops being read


class HTTP1Error(Exception):
    """The connection failed (refused, reset, closed mid-reply) or the reply broke HTTP/1.1."""


class _Stale(HTTP1Error):
    """A reused connection the server had closed before it answered (nothing of a reply arrived)."""


class HTTP1Response:
    def __init__(self, conn: _Connection, read_timeout_s: float | None = None):
        self._conn: _Connection | None = conn
        self.read_timeout_s = read_timeout_s  # bounds each wait for more of the body
        self.status_code = 0
        self.reason_phrase = ""
        self.headers: dict[str, str] = {}
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._content: bytes | None = None
        self._decoder: Any = None  # zlib decompressor for a gzip / deflate body
        self._whole = False  # read whole by aread: never paused
        self._headed: asyncio.Future | None = None  # set once the status and headers are in

    # -- fed by the connection ---------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _PAUSE_AT and self._conn is not None and not self._whole:
            self._conn.pause()
        self._wake()

    def _head_done(self, error: BaseException | None = None) -> None:
        h, self._headed = self._headed, None
        if h is not None and not h.done():
            if error is None:
                h.set_result(None)
            else:
                h.set_exception(error)

    def _finish(self, error: BaseException | None = None) -> None:
        if self._done:
            return
        self._done, self._error = True, error
        self._wake()

    # -- read by the caller ------------------------------------------------------------------
    async def _wait(self, limit_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = None
        if limit_s is not None:

            def expire() -> None:
                if not waiter.done():
                    waiter.set_exception(TimeoutError(f"no data from the server for {limit_s:g}s"))

            timer = loop.call_later(limit_s, expire)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        while True:
            while self._chunks:
                data = self._chunks.popleft()
                self._buffered -= len(data)
                if self._conn is not None and self._buffered <= _PAUSE_AT:
                    self._conn.resume()
                yield data
            if self._done:
                if self._error is not None:
                    raise self._error
                return
            await self._wait(self.read_timeout_s)

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        async for data in self.aiter_raw():
            if self._decoder is not None:
                data = self._decoder.decompress(data)
            if data:
                yield data
        if self._decoder is not None and (tail := self._decoder.flush()):
            yield tail

    async def aiter_lines(self) -> AsyncIterator[str]:
        """Lines without their ends, split at \\n, \\r\\n and \\r as httpx splits them."""
        text = codecs.getincrementaldecoder("utf-8")("replace")
        pending = ""
        async for data in self.aiter_bytes():
            pending += text.decode(data)
            if "\r" in pending:
                held = pending.endswith("\r")  # its \n may come in the next chunk
                pending = pending[:-1] if held else pending
                pending = pending.replace("\r\n", "\n").replace("\r", "\n") + ("\r" if held else "")
            *lines, pending = pending.split("\n")
            for line in lines:
                yield line
        pending += text.decode(b"", final=True)
        if pending.endswith("\r"):
            pending = pending[:-1]
        if pending:
            yield pending

    async def aread(self) -> bytes:
        if self._content is None:
            self._whole = True
            if self._conn is not None:
                self._conn.resume()
            while not self._done:
                await self._wait(self.read_timeout_s)
            if self._error is not None:
                raise self._error
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            if self._decoder is not None:
                data = self._decoder.decompress(data) + self._decoder.flush()
            self._content = data
        return self._content

    @property
    def content(self) -> bytes:
        if self._content is None:
            raise RuntimeError("the reply's body has not been read (await aread() first)")
        return self._content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return fastjson.loads(self.content)

    async def aclose(self) -> None:
        """Releases the reply; a connection whose reply was not read to its end is closed."""
        if not self._done and self._conn is not None:
            self._conn.close()
            self._finish(HTTP1Error("the reply was closed before its end"))
        self._conn = None


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, each reply parsed as it arrives."""

    def __init__(self, pool: HTTP1Pool):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: HTTP1Response | None = None
        self.received = False  # any byte of the current reply
        self.closed = False
        self.paused = False
        self._header: list[tuple[bytes, bytes]] = []
        self._reason = b""

    # -- asyncio -----------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes nobody asked for: the connection is out of step
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(HTTP1Error(f"invalid HTTP reply from {self.pool.where}: {e}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        r = self.response
        if r is None:
            return
        if r.status_code and not self._framed and exc is None:
            r._finish()  # a body delimited by the end of the connection
        elif not self.received:
            self._fail(_Stale(f"{self.pool.where} closed the connection before replying"))
        else:
            why = f": {exc}" if exc else ""
            self._fail(HTTP1Error(f"{self.pool.where} closed the connection mid-reply{why}"))

    # -- httptools callbacks -----------------------------------------------------------------
    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        r = self.response
        if r is None or status < 200:  # an interim reply (100 Continue, ...): the real one follows
            self._header, self._reason = [], b""
            return
        headers: dict[str, str] = {}
        for name, value in self._header:
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self._header, self._reason, reason = [], b"", self._reason
        r.status_code, r.reason_phrase, r.headers = status, reason.decode("latin-1"), headers
        self._framed = (
            "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()
        )
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            r._decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, told apart by header
        elif encoding not in ("identity", ""):
            self._fail(HTTP1Error(f"{self.pool.where} sent content-encoding {encoding!r} (not asked for)"))
            self.close()
            return
        r._head_done()

    def on_body(self, body: bytes) -> None:
        if self.response is not None and self.response.status_code:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        r = self.response
        if r is None or not r.status_code:
            return  # the end of an interim reply
        self.response = None
        keep = self.parser.should_keep_alive()
        r._finish()
        r._conn = None
        if keep and not self.closed:
            self.pool.release(self)
        else:
            self.close()

    # -- the pool's side ---------------------------------------------------------------------
    _framed = True

    def send(self, data: bytes, response: HTTP1Response) -> None:
        assert self.transport is not None
        self.response, self.received = response, False
        self.transport.write(data)

    def _fail(self, error: BaseException) -> None:
        r, self.response = self.response, None
        if r is not None:
            r._head_done(error)
            r._finish(error)

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()


class HTTP1Pool:
    """Keep-alive connections to one `http://host:port`, at most `max_connections` open (callers
    beyond that wait for one). Made in, and used from, one event loop."""

    def __init__(self, base_url: str, max_connections: int = 64, user_agent: str = "advisor"):
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"the http1 client takes http://host[:port] URLs only, not {base_url!r}")
        self.host, self.port = url.hostname, url.port or 80
        self.where = f"{self.host}:{self.port}"
        default_port = url.port is None or url.port == 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = host if default_port else f"{host}:{self.port}"
        self._fixed = (
            f"Host: {self._host_header}\r\nUser-Agent: {user_agent}\r\nAccept-Encoding: identity\r\n"
        )
        self.max_connections = max_connections
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._waiters: deque[asyncio.Future] = deque()
        self._connecting = 0
        self._paths: dict[str, bytes] = {}
        self.closed = False

    # -- connections -------------------------------------------------------------------------
    async def _connection(self, fresh: bool = False) -> tuple[_Connection, bool]:
        """An idle connection (reused: True) unless `fresh`, or a new one."""
        while self._idle and not fresh:
            conn = self._idle.pop()
            if not conn.closed:
                return conn, True
        while len(self._open) + self._connecting >= self.max_connections:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif not waiter.cancelled():
                    self._wake_one()  # it was handed a turn it will not use
                raise
            while self._idle and not fresh:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn, True
        loop = asyncio.get_running_loop()
        self._connecting += 1  # counted against the limit while it connects
        try:
            _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except OSError as e:
            self._wake_one()
            raise HTTP1Error(f"cannot connect to {self.where}: {e.strerror or e}") from None
        finally:
            self._connecting -= 1
        self._open.add(conn)
        return conn, False

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def release(self, conn: _Connection) -> None:
        if self.closed:
            conn.close()
            return
        self._idle.append(conn)
        self._wake_one()

    def forget(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake_one()

    # -- requests ----------------------------------------------------------------------------
    def _head(self, method: str, url: str, headers: dict[str, str], length: int) -> bytes:
        path = self._paths.get(url)
        if path is None:
            parts = urlsplit(url)
            if (parts.hostname, parts.port or 80) != (self.host, self.port):
                raise ValueError(f"{url!r} is not on {self.where}")
            path = self._paths[url] = (parts.path or "/").encode() + (
                b"?" + parts.query.encode() if parts.query else b""
            )
        lines = [f"{method} ", path.decode("latin-1"), " HTTP/1.1\r\n", self._fixed]
        for name, value in headers.items():
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name or ":" in name:
                raise ValueError(f"HTTP header {name!r}: a name or value holds a line break or colon")
            lines += (name, ": ", value, "\r\n")
        lines.append(f"Content-Length: {length}\r\n\r\n")
        return "".join(lines).encode("latin-1")

    async def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes,
        read_timeout_s: float | None = None,
    ) -> HTTP1Response:
        """Sends the request; returns once the reply's status and headers are in (read its body
        with `aread` or the `aiter_*` methods, each wait for more bounded by `read_timeout_s`, then
        `aclose` it). Bound the whole call with `asyncio.timeout` as needed."""
        data = self._head(method, url, headers, len(body)) + body
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            conn, reused = await self._connection(fresh=attempt > 0)
            response = HTTP1Response(conn, read_timeout_s)
            response._headed = headed = loop.create_future()
            try:
                conn.send(data, response)
                await headed
            except _Stale:
                if reused and attempt == 0:
                    continue  # the server closed it while it was idle: once more, on a new one
                raise
            except BaseException:
                conn.close()  # cancelled or failed mid-exchange: its state is unknown
                raise
            return response
        raise AssertionError("unreachable: the second try is on a new connection")

    def close(self) -> None:
        self.closed = True
        for conn in [*self._idle, *self._open]:
            conn.close()
        self._idle.clear()
