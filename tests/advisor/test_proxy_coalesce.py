"""advisor.proxy.coalesce: a connection's writes within one event-loop tick go out as one."""

from __future__ import annotations

import asyncio

import httpx

from advisor.proxy.coalesce import _CoalescingTransport
from advisor.testing import ScriptedServer
from tests.advisor.proxy_helpers import make_config, proxy_for


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str):
        return f"info:{name}"


async def test_writes_of_one_tick_are_one_write_and_close_sends_what_is_pending():
    raw = FakeTransport()
    t = _CoalescingTransport(raw, asyncio.get_running_loop())
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    t.write(b"body")
    assert raw.writes == []  # until the end of the tick
    await asyncio.sleep(0)
    assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    t.writelines([b"a", b"b"])
    await asyncio.sleep(0)
    t.write(b"c")
    t.close()  # a close sends what is pending first
    assert raw.writes[1:] == [b"ab", b"c"] and raw.closed
    t.write(b"late")
    await asyncio.sleep(0)
    assert raw.writes[-1] == b"c"  # nothing goes to a closed transport
    assert t.get_extra_info("peername") == "info:peername"  # the rest is the transport's


def test_replies_through_the_coalescing_protocol_are_whole(tmp_path):
    with ScriptedServer({"flash": ["one", "two"]}) as upstream:
        cfg = make_config(upstream, tmp_path)
        with proxy_for(cfg) as proxy, httpx.Client() as client:  # one keep-alive connection
            body = {"model": "advisor", "messages": [{"role": "user", "content": "x"}]}
            texts = [
                client.post(f"{proxy.base_url}/chat/completions", json=body).json()["choices"][0]["message"][
                    "content"
                ]
                for _ in range(2)
            ]
    assert texts == ["one", "two"]
