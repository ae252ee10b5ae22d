"""Proxy overhead: `python -m advisor.bench --proxy`.

A zero-latency upstream (a bare ASGI app on uvicorn, in its own process, answering a fixed chat
completion or stream at once) is called directly and through `advisor proxy` (the real command, in its
own process, journal fsync on), at 1 and at 40 concurrent sessions, non-streamed and streamed, in one
run. Printed side by side: client-side latency p50 / p99 direct and proxied, the added latency, the
proxy process's CPU per request, and requests per second through the proxy.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

_REPLY = {
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
_BODY = json.dumps(_REPLY).encode()
_CHUNKS = [
    {
        **_REPLY,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": _REPLY["choices"][0]["message"], "finish_reason": None}],
    },
    {
        **_REPLY,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
    },
    {**_REPLY, "object": "chat.completion.chunk", "choices": []},
]
_STREAM = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in _CHUNKS) + b"data: [DONE]\n\n"


async def upstream_app(scope, receive, send):
    """The zero-latency upstream: reads the body, answers the fixed reply (a stream when asked)."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    stream = b'"stream":true' in body.replace(b" ", b"")
    payload, kind = (_STREAM, b"text/event-stream") if stream else (_BODY, b"application/json")
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", kind), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode})")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url}: the server did not start")


def _request(stream: bool) -> dict:
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
    body = {"model": "advisor", "messages": messages, "tools": [tool]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


async def _load(
    url: str, concurrency: int, total: int, stream: bool, model: str
) -> tuple[list[float], float, int]:
    """(latencies of the requests that succeeded, wall seconds, failed requests)."""
    body = {**_request(stream), "model": model}
    latencies: list[float] = []
    failed = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one(session: int, n: int) -> None:
            nonlocal failed
            headers = {"x-advisor-session": f"bench-{session}"}
            for _ in range(n):
                t0 = time.perf_counter()
                try:
                    if stream:
                        async with client.stream("POST", url, json=body, headers=headers) as r:
                            async for _chunk in r.aiter_bytes():
                                pass
                    else:
                        r = await client.post(url, json=body, headers=headers)
                except httpx.TransportError:
                    failed += 1  # counted and shown, never retried: a retry would hide it
                    continue
                if r.status_code != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status_code}")
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(one(i, 10) for i in range(concurrency)))  # warm the connections
        latencies.clear()
        failed = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, total // concurrency) for i in range(concurrency)))
        return latencies, time.perf_counter() - t0, failed


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def main(requests: int = 2000) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        up_port, px_port = _free_port(), _free_port()
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "advisor.proxy.bench:upstream_app",
                "--port",
                str(up_port),
                "--log-level",
                "warning",
                "--no-access-log",
            ]
        )
        config = Path(tmp) / "proxy.yaml"
        price = {"input": 0.20, "cached_input": 0.04, "output": 1.15}
        config.write_text(
            yaml.safe_dump(
                {
                    "executor": {"endpoint": "flash"},
                    "frontier": {"endpoint": "big"},
                    "escalation": {"after_failures": 2},
                    "budget": {"max_usd": 1000},
                    "endpoints": {
                        "flash": {
                            "provider": "openai",
                            "model": "flash",
                            "base_url": f"http://127.0.0.1:{up_port}/v1",
                            "price": price,
                        },
                        "big": {
                            "provider": "openai",
                            "model": "big",
                            "base_url": f"http://127.0.0.1:{up_port}/v1",
                            "price": price,
                        },
                    },
                }
            )
        )
        env = {**os.environ, "ADVISOR_CONFIG_DIR": str(Path(tmp) / "no-config")}
        px = subprocess.Popen(
            [sys.executable, "-m", "advisor.cli", "proxy", "--config", str(config), "--port", str(px_port)],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait(f"http://127.0.0.1:{up_port}/", up)
            _wait(f"http://127.0.0.1:{px_port}/health", px)
            print(
                "| sessions | stream | requests | direct p50 / p99 ms | proxied p50 / p99 ms | added p50 / p99 ms "
                "| proxy CPU ms/req | proxied req/s | failed direct / proxied |"
            )
            print("|---:|:---:|---:|---:|---:|---:|---:|---:|---:|")
            for conc in (1, 40):
                for stream in (False, True):
                    n = requests if conc > 1 else requests // 4
                    direct, _, failed_direct = asyncio.run(
                        _load(f"http://127.0.0.1:{up_port}/v1/chat/completions", conc, n, stream, "flash")
                    )
                    cpu0 = _cpu_s(px.pid)
                    proxied, wall, failed_proxied = asyncio.run(
                        _load(f"http://127.0.0.1:{px_port}/v1/chat/completions", conc, n, stream, "advisor")
                    )
                    cpu = (_cpu_s(px.pid) - cpu0) * 1000 / max(1, len(proxied) + failed_proxied)
                    d50, d99, p50, p99 = (
                        _pct(direct, 0.5),
                        _pct(direct, 0.99),
                        _pct(proxied, 0.5),
                        _pct(proxied, 0.99),
                    )
                    print(
                        f"| {conc} | {'yes' if stream else 'no'} | {len(proxied)} | {d50:.2f} / {d99:.2f} | {p50:.2f} / {p99:.2f} "
                        f"| {p50 - d50:.2f} / {p99 - d99:.2f} | {cpu:.2f} | {len(proxied) / wall:.0f} "
                        f"| {failed_direct} / {failed_proxied} |"
                    )
        finally:
            for proc in (px, up):
                proc.terminate()
                proc.wait(timeout=30)
    load = os.getloadavg()[0]
    print(
        f"(cores: {os.cpu_count()}, load average {load:.1f}; the client, the proxy and the upstream share them)"
    )
    return 0
