"""advisor.endpoints.http1 against raw asyncio servers that answer byte by byte as scripted: bodies
framed every way HTTP/1.1 allows, keep-alive reuse, a server closing idle connections, interim
replies, timeouts, cancellation and the connection limit."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable

import pytest

from advisor.endpoints.http1 import HTTP1Error, HTTP1Pool


class RawServer:
    """Answers each request whole with `answer(n, request)` (bytes to send, or None to close)."""

    def __init__(self, answer: Callable[[int, bytes], bytes | list[bytes] | None]):
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1/x"
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        for w in self.writers:
            w.close()
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                out = self.answer(len(self.requests), request)
                if out is None:
                    writer.close()
                    return
                for piece in out if isinstance(out, list) else [out]:
                    if isinstance(piece, float):
                        await asyncio.sleep(piece)
                        continue
                    writer.write(piece)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def ok(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n" % len(body) + b"".join(e + b"\r\n" for e in extra)
    return head + b"\r\n" + body


async def post(pool: HTTP1Pool, url: str, body: bytes = b"{}", **headers: str):
    r = await pool.request("POST", url, {"Content-Type": "application/json", **headers}, body, 5.0)
    await r.aread()
    await r.aclose()
    return r


async def test_content_length_chunked_and_close_delimited_bodies_and_gzip():
    answers = [
        ok(b"plain"),
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nchu\r\n4\r\nnked\r\n0\r\n\r\n",
        ok(gzip.compress(b"zipped"), b"content-encoding: gzip"),
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end",
    ]
    async with RawServer(lambda n, req: answers[n - 1] if n < 4 else [answers[3], None]) as server:
        pool = HTTP1Pool(f"http://127.0.0.1:{server.port}")
        got = [(await post(pool, server.url)).content for _ in answers]
        pool.close()
    assert got == [b"plain", b"chunked", b"zipped", b"until the end"]
    assert server.connections == 1  # kept alive until the close-delimited reply
    first = server.requests[0]
    assert first.startswith(b"POST /v1/x HTTP/1.1\r\n") and b"\r\nContent-Length: 2\r\n" in first
    assert first.endswith(b"\r\n\r\n{}") and b"Accept-Encoding: identity" in first


async def test_an_idle_connection_the_server_closed_is_replaced():
    async with RawServer(lambda n, req: ok(b"%d" % n)) as server:
        pool = HTTP1Pool(f"http://127.0.0.1:{server.port}")
        got = [(await post(pool, server.url)).content]
        for wait in (0.0, 0.05):  # closed as the next request goes out (the race), or well before
            for w in server.writers:  # the server drops its idle connections without a word
                w.close()
            await asyncio.sleep(wait)
            got.append((await post(pool, server.url)).content)
        pool.close()
    assert got == [b"1", b"2", b"3"] and server.connections == 3


async def test_interim_replies_are_skipped_and_headers_read():
    reply = b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b'{"a": 1}', b"X-Thing: one", b"x-thing: two")
    async with RawServer(lambda n, req: reply) as server:
        pool = HTTP1Pool(f"http://127.0.0.1:{server.port}")
        r = await post(pool, server.url)
        pool.close()
    assert r.status_code == 200 and r.json() == {"a": 1} and r.headers["x-thing"] == "one, two"


async def test_error_statuses_and_lines_split_like_httpx():
    sse = b"data: a\r\n\r\ndata: b\n\ndata: c\r"
    pieces = [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]
    for i in range(0, len(sse), 3):  # line ends split across chunks, \r\n among them
        part = sse[i : i + 3]
        pieces.append(b"%x\r\n%s\r\n" % (len(part), part))
    pieces.append(b"0\r\n\r\n")
    answers = [b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 2\r\ncontent-length: 4\r\n\r\nbusy", pieces]
    async with RawServer(lambda n, req: answers[n - 1]) as server:
        pool = HTTP1Pool(f"http://127.0.0.1:{server.port}")
        busy = await post(pool, server.url)
        r = await pool.request("POST", server.url, {}, b"", 5.0)
        lines = [line async for line in r.aiter_lines()]
        await r.aclose()
        pool.close()
    assert (busy.status_code, busy.reason_phrase, busy.headers["retry-after"], busy.text) == (
        503,
        "Service Unavailable",
        "2",
        "busy",
    )
    assert lines == ["data: a", "", "data: b", "", "data: c"]


async def test_a_stalled_body_times_out_and_a_cancelled_call_closes_its_connection():
    stall = [b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf", 30.0]
    async with RawServer(lambda n, req: stall) as server:
        pool = HTTP1Pool(f"http://127.0.0.1:{server.port}")
        r = await pool.request("POST", server.url, {}, b"", 0.2)
        with pytest.raises(TimeoutError, match="no data from the server for 0.2s"):
            await r.aread()
        await r.aclose()
        task = asyncio.ensure_future(pool.request("POST", server.url, {}, b"", None))
        await asyncio.sleep(0.05)
        r2 = await task  # headers in, body stalled
        reader = asyncio.ensure_future(r2.aread())
        await asyncio.sleep(0.05)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await r2.aclose()
        assert not pool._idle and not pool._open  # neither half-read connection is reused
        pool.close()


async def test_a_server_gone_mid_reply_or_refusing_is_an_http1_error():
    async with RawServer(
        lambda n, req: [b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhal", None]
    ) as server:
        pool = HTTP1Pool(f"http://127.0.0.1:{server.port}")
        with pytest.raises(HTTP1Error, match="closed the connection mid-reply"):
            await post(pool, server.url)
        pool.close()
    refused = HTTP1Pool(f"http://127.0.0.1:{server.port}")
    with pytest.raises(HTTP1Error, match="cannot connect to 127.0.0.1"):
        await post(refused, server.url)


async def test_the_connection_limit_holds_callers_until_one_is_free():
    async with RawServer(lambda n, req: [0.05, ok(b"%d" % n)]) as server:
        pool = HTTP1Pool(f"http://127.0.0.1:{server.port}", max_connections=2)
        replies = await asyncio.gather(*(post(pool, server.url) for _ in range(5)))
        pool.close()
    assert sorted(r.content for r in replies) == [b"1", b"2", b"3", b"4", b"5"]
    assert server.connections == 2


async def test_headers_cannot_smuggle_lines():
    pool = HTTP1Pool("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="line break"):
        await pool.request("POST", "http://127.0.0.1:9/x", {"X-A": "1\r\nX-B: 2"}, b"")
    with pytest.raises(ValueError, match="http://host"):
        HTTP1Pool("https://example.com")
