"""The proxy benchmark's load generator, in its own process: `python -m advisor.proxy.bench_client SPEC`.

SPEC is a JSON object: `url` (http://host:port/path), `model`, `stream`, `sessions` (one keep-alive
connection and one `x-advisor-session` each), `requests` (in all), optionally `key_env` (the variable
holding the API key to send as a Bearer token) and `rate` (requests per
second, offered open-loop: request i is due at i / rate and its latency counts from then, so a server
that falls behind shows it) and `warm` (requests per session before the measured part).

Requests are precomputed bytes and replies are read with a minimal HTTP/1.1 parser (content-length
or chunked), so the client spends little of the machine's CPU. After warming up it prints `warm`,
waits for a line on stdin (the parent reads the other processes' CPU counters then), runs, and prints
one JSON line: latencies in ms, wall seconds, failed requests, and its own CPU seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from urllib.parse import urlsplit

from advisor.proxy.bench_upstream import run


def request_body(stream: bool, model: str) -> bytes:
    """A coding agent's turn: a long system prompt, a tool call and its result, one tool schema."""
    messages = [
        {"role": "system", "content": "You are a coding agent. " * 40},
        {"role": "user", "content": "List the files, then fix the failing test."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c0", "type": "function", "function": {"name": "bash", "arguments": '{"cmd": "pwd"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c0", "content": "/work/repo"},
    ]
    tool = {
        "type": "function",
        "function": {
            "name": "bash",
            "description": "run a command",
            "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
        },
    }
    body: dict = {"model": model, "messages": messages, "tools": [tool]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body, separators=(",", ":")).encode()


class HTTPError(Exception):
    pass


async def read_response(reader: asyncio.StreamReader) -> int:
    """Reads one whole response (content-length or chunked); returns its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.find(b"\r\n", at + 2)
        await reader.readexactly(int(lower[at + 17 : end]))
    elif b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            await reader.readexactly(size + 2)
    else:
        raise HTTPError("a response with neither content-length nor chunked encoding")
    return status


class Session:
    def __init__(self, host: str, port: int, request: bytes):
        self.host, self.port, self.request = host, port, request
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        try:
            self.writer.write(self.request)
            status = await read_response(self.reader)
        except (OSError, asyncio.IncompleteReadError, ValueError, HTTPError):
            self.writer.close()
            self.writer = None
            raise
        if status != 200:
            raise HTTPError(f"HTTP {status}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def http_request(host: str, port: int, path: str, body: bytes, session: str, key: str | None = None) -> bytes:
    auth = f"authorization: Bearer {key}\r\n" if key else ""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n{auth}"
        f"x-advisor-session: {session}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def main(spec: dict) -> dict:
    url = urlsplit(spec["url"])
    host, port = url.hostname or "127.0.0.1", url.port or 80
    body = request_body(spec["stream"], spec["model"])
    n_sessions, total, rate = spec["sessions"], spec["requests"], spec.get("rate")
    key = os.environ.get(spec["key_env"]) if spec.get("key_env") else None  # never in argv
    sessions = [
        Session(host, port, http_request(host, port, url.path, body, f"bench-{i}", key))
        for i in range(n_sessions)
    ]
    for _ in range(spec.get("warm", 10)):
        await asyncio.gather(*(s.call() for s in sessions))
    print("warm", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    latencies: list[float] = []
    failed = 0
    per_session = total // n_sessions
    cpu0 = os.times()
    t0 = time.perf_counter()

    async def worker(w: int) -> None:
        nonlocal failed
        s = sessions[w]
        for k in range(per_session):
            if rate:
                due = t0 + (k * n_sessions + w) / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                start = due  # open loop: time spent queued behind a slow server counts
            else:
                start = time.perf_counter()
            try:
                await s.call()
            except (OSError, asyncio.IncompleteReadError, ValueError, HTTPError):
                failed += 1  # counted and shown, never retried: a retry would hide it
                continue
            latencies.append((time.perf_counter() - start) * 1000)

    await asyncio.gather(*(worker(w) for w in range(n_sessions)))
    wall = time.perf_counter() - t0
    cpu1 = os.times()
    for s in sessions:
        s.close()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {"latencies_ms": latencies, "wall_s": wall, "failed": failed, "cpu_s": cpu}


if __name__ == "__main__":
    result: dict = {}

    async def _run() -> None:
        result.update(await main(json.loads(sys.argv[1])))

    run(_run())
    print(json.dumps(result), flush=True)
