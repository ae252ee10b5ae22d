import asyncio
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import respx
from advisor.tools.registry import BUILTIN
from advisor.tools.spec import ToolContext
from advisor.tools.web import SearchRateLimited, html_to_text

SEARCH, FETCH = BUILTIN["web_search"], BUILTIN["fetch_page"]

PAGE = """<html><head><title>Receipt totals</title><style>body{color:red}</style>
<script>var secret = "do not show";</script></head>
<body><nav>Home | About</nav><h1>How to read a receipt</h1>
<p>The <b>total</b> is the last   amount.</p><ul><li>Subtotal</li><li>Tax</li></ul>
<footer>cookie banner</footer></body></html>"""


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def test_real_search_fails_cleanly_when_unreachable(tmp_path, monkeypatch):
    # Route ddgs through a closed local port: unreachable whether or not this machine is online.
    monkeypatch.setenv("DDGS_PROXY", f"http://127.0.0.1:{_closed_port()}")
    t = time.monotonic()
    r = await SEARCH.invoke(
        {"query": "receipt total"}, ToolContext(workspace=tmp_path, extra={"search_timeout_s": 8})
    )
    assert time.monotonic() - t < 12
    assert r.is_error and r.text.startswith("error: web_search") and "\n" not in r.text


async def test_search_formats_results_from_a_backend(tmp_path):
    seen = {}

    def backend(query, max_results, timeout_s):
        seen.update(query=query, max_results=max_results)
        return [
            {
                "title": "Step 3.7 Flash",
                "href": "https://example.com/a",
                "body": "A  sparse\nMoE model " + "x" * 400,
            },
            {"title": "", "href": "https://example.com/b", "body": "untitled"},
            {"title": "no url", "body": "dropped"},
        ]

    ctx = ToolContext(workspace=tmp_path, extra={"search_backend": backend})
    r = await SEARCH.invoke({"query": "  step flash  ", "max_results": 3}, ctx)
    assert seen == {"query": "step flash", "max_results": 3}
    lines = r.text.splitlines()
    assert lines[0] == "1. Step 3.7 Flash" and lines[1] == "   https://example.com/a"
    assert lines[2].startswith("   A sparse MoE model xxx") and len(lines[2]) <= 303
    assert lines[3] == "2. https://example.com/b" and len(r.data) == 2
    assert r.data[0] == {
        "title": "Step 3.7 Flash",
        "url": "https://example.com/a",
        "snippet": lines[2].strip(),
    }


async def test_search_failures_are_clear_errors(tmp_path):
    def limited(*_):
        raise SearchRateLimited("202 Ratelimit")

    def hangs(*_):
        time.sleep(30)

    def broken(*_):
        raise ConnectionError("network\nunreachable")

    cases = [
        (limited, "rate-limiting"),
        (hangs, "timed out (no answer within 0.5 s)"),
        (broken, "web_search failed (offline or blocked?): ConnectionError: network unreachable"),
        (lambda *_: [], None),
    ]
    for backend, needle in cases:
        ctx = ToolContext(workspace=tmp_path, extra={"search_backend": backend, "search_timeout_s": 0.5})
        t = time.monotonic()
        r = await SEARCH.invoke({"query": "q"}, ctx)
        assert time.monotonic() - t < 3
        if needle is None:
            assert not r.is_error and r.text == "no results for 'q'"
        else:
            assert r.is_error and needle in r.text, r.text
    r = await SEARCH.invoke({"query": "q", "max_results": 50}, ToolContext(workspace=tmp_path))
    assert r.is_error and "'max_results'" in r.text
    r = await SEARCH.invoke({"query": " "}, ToolContext(workspace=tmp_path))
    assert r.is_error and "query is empty" in r.text


def test_html_to_text_keeps_content_only():
    title, text = html_to_text(PAGE)
    assert title == "Receipt totals"
    assert text.splitlines() == [
        "# How to read a receipt",
        "The total is the last amount.",
        "- Subtotal",
        "- Tax",
    ]


@respx.mock
async def test_fetch_page_wire_cases(tmp_path):
    ctx = ToolContext(workspace=tmp_path)
    respx.get("https://example.com/page").mock(return_value=httpx.Response(200, html=PAGE))
    respx.get("https://example.com/missing").mock(return_value=httpx.Response(404))
    respx.get("https://example.com/pic").mock(
        return_value=httpx.Response(200, content=b"\x89PNG", headers={"content-type": "image/png"})
    )
    respx.get("https://example.com/hop").mock(
        return_value=httpx.Response(302, headers={"location": "http://169.254.169.254/latest/meta-data"})
    )
    respx.get("https://example.com/slow").mock(side_effect=httpx.ReadTimeout("slow"))
    respx.get("https://example.com/long").mock(return_value=httpx.Response(200, text="word " * 5000))

    r = await FETCH.invoke({"url": "example.com/page"}, ctx)
    assert not r.is_error and r.text.startswith("Receipt totals\nhttps://example.com/page\n\n# How to read")
    assert "do not show" not in r.text and "cookie banner" not in r.text
    for url, needle in [
        ("https://example.com/missing", "HTTP 404 Not Found from example.com"),
        ("https://example.com/pic", "image/png is not a text page"),
        ("https://example.com/hop", "refusing private or local address 169.254.169.254"),
        ("https://example.com/slow", "timed out"),
        ("ftp://example.com/x", "only http and https"),
        ("http://127.0.0.1:8080/admin", "refusing private or local address 127.0.0.1"),
        ("http://localhost/", "refusing local host localhost"),
        ("http://2130706433/", "refusing private or local address 2130706433 (127.0.0.1)"),
        ("http://0x7f.1/", "refusing private or local address 0x7f.1 (127.0.0.1)"),
        ("http://[::1]:8000/", "refusing private or local address ::1"),
        ("http://10.1.2.3/", "refusing private or local address 10.1.2.3"),
    ]:
        r = await FETCH.invoke({"url": url}, ctx)
        assert r.is_error and needle in r.text, (url, r.text)
    r = await FETCH.invoke({"url": "https://example.com/long", "max_chars": 1000}, ctx)
    assert "more characters; fetch again with offset=1000" in r.text


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/big":
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.end_headers()
            for _ in range(4000):  # 4 MB, more than the 3 MB cap
                self.wfile.write(b"a" * 1023 + b"\n")
            return
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.end_headers()
        self.wfile.write(PAGE.encode())


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


async def test_fetch_page_from_a_real_local_server(tmp_path, server):
    ctx = ToolContext(workspace=tmp_path, extra={"fetch_allow_private": True})
    r = await FETCH.invoke({"url": server + "/page"}, ctx)
    assert not r.is_error and "The total is the last amount." in r.text
    r = await FETCH.invoke({"url": server + "/big", "max_chars": 20000}, ctx)
    assert not r.is_error and r.data["truncated_bytes"] and r.data["bytes"] == 3_000_000
    assert "[page cut at 3000000 bytes]" in r.text
    r = await FETCH.invoke({"url": f"http://127.0.0.1:{_closed_port()}/"}, ctx)
    assert r.is_error and "cannot fetch 127.0.0.1 (offline?): ConnectError" in r.text


async def test_many_stuck_searches_hold_no_worker_threads(tmp_path):
    release = threading.Event()

    def stuck(*_):
        release.wait(10)
        return []

    ctx = ToolContext(workspace=tmp_path, extra={"search_backend": stuck, "search_timeout_s": 0.5})
    t = time.monotonic()
    results = await asyncio.gather(*(SEARCH.invoke({"query": f"q{i}"}, ctx) for i in range(30)))
    assert time.monotonic() - t < 2.5 and all(r.is_error and "timed out" in r.text for r in results)
    # the loop's default executor is still free for other tools
    assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 1) == 42
    release.set()
