"""Run the proxy in a background thread on 127.0.0.1 (tests, notebooks, a harness started from Python).

with ProxyServer(Router(load_proxy_config("proxy.yaml"))) as proxy:
    client = openai.OpenAI(base_url=proxy.base_url, api_key="unused")
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from advisor.proxy.app import UVICORN_OPTIONS, build_app
from advisor.proxy.router import Router


class ProxyServer:
    def __init__(self, router: Router, host: str = "127.0.0.1", port: int = 0):
        self.router, self.host, self.port = router, host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """For OpenAI clients (ends in /v1); Anthropic clients take `root_url`."""
        return f"{self.root_url}/v1"

    def start(self) -> ProxyServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(build_app(self.router), timeout_graceful_shutdown=2, **UVICORN_OPTIONS)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="advisor-proxy", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the proxy failed to start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> ProxyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def __aenter__(self) -> ProxyServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.stop)
