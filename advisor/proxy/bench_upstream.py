"""The proxy benchmark's zero-latency upstream: `python -m advisor.proxy.bench_upstream PORT`.

A bare asyncio protocol (on uvloop when installed) speaking just enough HTTP/1.1 keep-alive to answer
every POST with a precomputed chat completion, or its server-sent-event stream when the body asks for
one. No framework and no JSON work per request, so nearly all the CPU the benchmark spends on the
upstream side is the kernel's: what the benchmark measures is the proxy.
"""

from __future__ import annotations

import asyncio
import json
import sys

REPLY = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 0,
    "model": "flash",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "bash", "arguments": '{"cmd": "ls"}'},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 900, "completion_tokens": 40, "prompt_tokens_details": {"cached_tokens": 800}},
}
_CHUNKS = [
    {
        **REPLY,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": REPLY["choices"][0]["message"], "finish_reason": None}],
    },
    {
        **REPLY,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
    },
    {**REPLY, "object": "chat.completion.chunk", "choices": []},
]
BODY = json.dumps(REPLY).encode()
STREAM = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in _CHUNKS) + b"data: [DONE]\n\n"


def _response(body: bytes, kind: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n" % (kind, len(body))
    return head + body


JSON_RESPONSE = _response(BODY, b"application/json")
STREAM_RESPONSE = _response(STREAM, b"text/event-stream")
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class Upstream(asyncio.Protocol):
    """One connection: requests are answered in order as each arrives whole."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            length = 0
            at = head.find(b"\ncontent-length:")
            if at >= 0:
                line_end = head.find(b"\r", at + 1)
                length = int(head[at + 16 : line_end if line_end >= 0 else None])
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = self.buf[end + 4 : total]
            self.buf = self.buf[total:]
            assert self.transport is not None
            if head.startswith(b"get"):
                self.transport.write(_OK)
            elif not head.startswith(b"post"):
                self.transport.write(_NOT_FOUND)
            elif b'"stream":true' in body or b'"stream": true' in body:
                self.transport.write(STREAM_RESPONSE)
            else:
                self.transport.write(JSON_RESPONSE)


async def serve(port: int, host: str = "127.0.0.1") -> None:
    server = await asyncio.get_running_loop().create_server(Upstream, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def run(coro) -> None:
    """asyncio.run on uvloop when it is installed (it is a dependency, but optional on Windows)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    run(serve(int(sys.argv[1])))
