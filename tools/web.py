"""Web tools: `web_search` (ddgs) and `fetch_page` (httpx), bounded in time and size.

Offline, rate-limited, blocked or slow all end as a one-line error result the model can read; the
tool never hangs the loop. Both are async and hold no worker thread while they wait, so many tasks
can search at once. Search backends are injectable (`ctx.extra["search_backend"]`, or
`set_search_backend`) so tests and users can swap DuckDuckGo for something else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from typing import Annotated

import httpx
from advisor.tools.spec import ToolContext, ToolError, ToolResult, tool
from pydantic import Field

SEARCH_TIMEOUT_S = 12.0
FETCH_TIMEOUT_S = 15.0
FETCH_MAX_BYTES = 3_000_000
FETCH_MAX_CHARS = 20_000
USER_AGENT = "Mozilla/5.0 (compatible; advisor-tools/0.1)"
BLOCK_TAGS = frozenset(
    "p div section article li tr br h1 h2 h3 h4 h5 h6 pre table ul ol blockquote header main dd dt".split()
)
DROP_XPATH = "//script|//style|//noscript|//template|//svg|//head|//nav|//footer|//form|//iframe"

# backend(query, max_results, timeout_s) -> [{"title", "href" | "url", "body" | "snippet"}, ...]
SearchBackend = Callable[[str, int, float], list[dict]]


class SearchRateLimited(Exception):
    pass


def ddgs_backend(query: str, max_results: int, timeout_s: float) -> list[dict]:
    from ddgs import DDGS
    from ddgs.exceptions import RatelimitException, TimeoutException

    try:
        return DDGS(timeout=max(1, int(timeout_s))).text(query, max_results=max_results)
    except RatelimitException as e:
        raise SearchRateLimited(str(e)) from None
    except TimeoutException as e:
        raise TimeoutError(str(e)) from None


_default_backend: SearchBackend = ddgs_backend


def set_search_backend(backend: SearchBackend | None) -> None:
    """Replace the process-wide search backend (None restores DuckDuckGo via ddgs)."""
    global _default_backend
    _default_backend = backend or ddgs_backend


async def call_bounded(fn: Callable, timeout_s: float, *args):
    """Await fn(*args), run in a daemon thread, for at most timeout_s.

    A daemon thread rather than the loop's executor: a wedged network call would otherwise hold a
    pool thread (and the process at exit) long after we stopped waiting for it.
    """
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():  # running futures cannot be cancelled under us
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting caller
            fut.set_exception(e)

    threading.Thread(target=run, daemon=True, name="bounded-call").start()
    try:
        return await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
    except TimeoutError:
        raise TimeoutError(f"no answer within {timeout_s:g} s") from None


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_results(results: list[dict], query: str) -> tuple[str, list[dict]]:
    rows = []
    for r in results:
        url = r.get("href") or r.get("url") or r.get("link") or ""
        title = _one_line(r.get("title") or url, 150)
        snippet = _one_line(r.get("body") or r.get("snippet") or "", 300)
        if url:
            rows.append({"title": title, "url": url, "snippet": snippet})
    if not rows:
        return f"no results for {query!r}", rows
    lines = [f"{i}. {r['title']}\n   {r['url']}\n   {r['snippet']}" for i, r in enumerate(rows, 1)]
    return "\n".join(lines), rows


@tool
async def web_search(
    ctx: ToolContext,
    query: str,
    max_results: Annotated[int, Field(ge=1, le=20)] = 5,
) -> ToolResult:
    """Search the web; returns title, url and snippet for each result.

    Args:
        query: what to search for
        max_results: how many results (1 to 20)
    """
    query = query.strip()
    if not query:
        raise ToolError("query is empty")
    extra = ctx.extra if ctx is not None else {}
    backend: SearchBackend = extra.get("search_backend") or _default_backend
    timeout = float(extra.get("search_timeout_s", SEARCH_TIMEOUT_S))
    try:
        results = await call_bounded(backend, timeout, query, max_results, timeout)
    except SearchRateLimited:
        raise ToolError(
            "web_search: the search provider is rate-limiting us; try later or answer without searching"
        ) from None
    except TimeoutError as e:
        raise ToolError(f"web_search: timed out ({e}); the network may be down") from None
    except Exception as e:  # noqa: BLE001 - every backend failure is the model's to route around
        raise ToolError(
            f"web_search failed (offline or blocked?): {type(e).__name__}: {_one_line(str(e))}"
        ) from None
    text, rows = format_results(list(results or [])[:max_results], query)
    return ToolResult(text=text, data=rows)


# ---- fetch_page ----------------------------------------------------------------------------------


async def _refuse_private(url: httpx.URL, allow_private: bool) -> None:
    if url.scheme not in ("http", "https"):
        raise ToolError(f"fetch_page: only http and https URLs, not {url.scheme or 'no scheme'}")
    if allow_private:
        return
    host = (url.host or "").strip("[]").lower()
    if host in ("localhost", "") or host.endswith(".localhost") or host.endswith(".internal"):
        raise ToolError(f"fetch_page: refusing local host {host or '(none)'}")
    for ip in await _addresses(host):
        if not ip.is_global or ip.is_multicast:
            shown = host if str(ip) == host else f"{host} ({ip})"
            raise ToolError(f"fetch_page: refusing private or local address {shown}")


async def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses a host stands for: literal forms ("127.1", "2130706433", "0x7f.0.0.1") and DNS.

    A name that does not resolve is let through: the request then fails on its own. (A name that
    resolves differently at request time, DNS rebinding, is not caught.)
    """
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        return [ipaddress.ip_address(socket.inet_aton(host))]  # the lenient forms the resolver accepts
    except OSError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


async def fetch_text(
    url: str,
    *,
    timeout_s: float = FETCH_TIMEOUT_S,
    max_bytes: int = FETCH_MAX_BYTES,
    allow_private: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[str, str, dict]:
    """(title, readable text, meta) of a web page; every failure is a ToolError."""
    if "://" not in url:
        url = "https://" + url
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise ToolError(f"fetch_page: invalid URL {url!r} ({e})") from None
    await _refuse_private(target, allow_private)
    deadline = time.monotonic() + timeout_s

    async def check_hop(request: httpx.Request) -> None:  # every redirect hop is checked too
        await _refuse_private(request.url, allow_private)

    try:
        async with (
            httpx.AsyncClient(
                timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 8.0)),
                follow_redirects=True,
                max_redirects=5,
                headers={
                    "User-Agent": USER_AGENT,
                    "Accept": "text/html,text/plain,application/json;q=0.9,*/*;q=0.5",
                },
                event_hooks={"request": [check_hop]},
                transport=transport,
            ) as client,
            client.stream("GET", target) as resp,
        ):
            if resp.status_code >= 400:
                raise ToolError(
                    f"fetch_page: HTTP {resp.status_code} {resp.reason_phrase} from {resp.url.host}"
                )
            ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
            textual = ctype.startswith("text/") or ctype in (
                "application/json",
                "application/xhtml+xml",
                "application/xml",
            )
            if ctype and not textual:
                raise ToolError(f"fetch_page: {ctype} is not a text page")
            chunks, size, cut = [], 0, False
            async for chunk in resp.aiter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size >= max_bytes:
                    cut = True
                    break
                if time.monotonic() > deadline:  # a server trickling bytes never trips the read timeout
                    raise ToolError(f"fetch_page: page still downloading after {timeout_s:g} s")
            raw = b"".join(chunks)[:max_bytes]
            encoding = resp.charset_encoding or "utf-8"
            final_url = str(resp.url)
    except ToolError:
        raise
    except httpx.TimeoutException:
        raise ToolError(f"fetch_page: timed out after {timeout_s:g} s fetching {target.host}") from None
    except httpx.TooManyRedirects:
        raise ToolError(f"fetch_page: too many redirects from {target.host}") from None
    except httpx.HTTPError as e:
        raise ToolError(
            f"fetch_page: cannot fetch {target.host} (offline?): {type(e).__name__}: {_one_line(str(e))}"
        ) from None
    try:
        body = raw.decode(encoding, errors="replace")
    except LookupError:
        body = raw.decode("utf-8", errors="replace")
    if ctype in ("text/html", "application/xhtml+xml") or (not ctype and "<html" in body[:2000].lower()):
        title, text = await asyncio.to_thread(html_to_text, body)  # parsing a few MB is CPU work
    else:
        title, text = "", body.strip()
    return title, text, {"url": final_url, "bytes": len(raw), "truncated_bytes": cut, "content_type": ctype}


def html_to_text(html: str) -> tuple[str, str]:
    """Title and readable text of an HTML page: scripts, styles and navigation chrome dropped."""
    import lxml.html
    from lxml import etree

    try:
        doc = lxml.html.document_fromstring(html)
    except (etree.ParserError, ValueError):
        return "", " ".join(html.split())
    title = " ".join((doc.findtext(".//title") or "").split())
    for bad in doc.xpath(DROP_XPATH):
        bad.drop_tree()
    for el in doc.iter():
        if isinstance(el.tag, str) and el.tag in BLOCK_TAGS:
            el.tail = "\n" + (el.tail or "")
            if el.tag[0] == "h" and el.tag[1:].isdigit():
                el.text = "# " + (el.text or "")
            elif el.tag == "li":
                el.text = "- " + (el.text or "")
    lines = [" ".join(line.split()) for line in doc.text_content().splitlines()]
    return title, "\n".join(line for line in lines if line)


@tool
async def fetch_page(
    ctx: ToolContext,
    url: str,
    offset: int = 0,
    max_chars: Annotated[int, Field(ge=100, le=FETCH_MAX_CHARS)] = 8000,
) -> ToolResult:
    """Fetch a web page and return its readable text (scripts and markup removed).

    Args:
        url: the http(s) address
        offset: character offset to start from (to page through a long page)
        max_chars: most characters to return
    """
    extra = ctx.extra if ctx is not None else {}
    timeout = float(extra.get("fetch_timeout_s", FETCH_TIMEOUT_S))
    fetch = fetch_text(
        url,
        timeout_s=timeout,
        allow_private=bool(extra.get("fetch_allow_private", False)),
        transport=extra.get("fetch_transport"),
    )
    try:
        # httpx's timeouts are per read; the outer bound also covers slow DNS and the redirect chain.
        title, text, meta = await asyncio.wait_for(fetch, timeout + 5)
    except TimeoutError:
        raise ToolError(f"fetch_page: gave up on {url} after {timeout + 5:g} s") from None
    offset = max(0, offset)
    chunk = text[offset : offset + max_chars]
    rest = len(text) - offset - len(chunk)
    head = f"{title}\n{meta['url']}\n\n" if title else f"{meta['url']}\n\n"
    if rest > 0:
        chunk += f"\n[... {rest} more characters; fetch again with offset={offset + len(chunk)} ...]"
    if meta["truncated_bytes"]:
        chunk += f"\n[page cut at {meta['bytes']} bytes]"
    return ToolResult(text=head + (chunk or "(no readable text)"), data=meta | {"title": title})
