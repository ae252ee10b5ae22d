"""Model Context Protocol tool servers as executor tools, through the official `mcp` SDK.

`McpServerConfig` says how to reach a server: a stdio command (`command`, `args`, `env` as variable
NAMES whose values are read from our environment at start, never written anywhere) or a streamable
HTTP `url` (`headers_env`: header name -> variable name). `McpConnection` starts one server and keeps
its session in a task of its own (the SDK's context managers must be entered and left in one task);
any task may call through it, at most `max_concurrent_calls` at a time. `McpPool` starts each
configured server once and shares it; `aclose()` stops them all.

Each of a server's tools becomes an `McpToolSpec` with the server's JSON schema. Results come back as
text; images go into the task's image ledger (op `mcp:<server>.<tool>`) and on to the model; an
`isError` result is an error result. A server that cannot start, dies or does not answer within
`timeout_s` is a one-line error (`McpError` at start, an error result for a call), never a hang.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import tempfile
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from advisor.tools.spec import ToolContext, ToolError, ToolResult, ToolSpec
from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_RESULT_CHARS = 20_000


class McpError(Exception):
    """An MCP server could not be started or used (one line)."""


class McpServerConfig(BaseModel):
    """One entry of a task's `mcp_servers:` mapping."""

    model_config = ConfigDict(extra="forbid")

    command: str | None = Field(default=None, description="stdio: the program that runs the server")
    args: list[str] = Field(default_factory=list, description="stdio: its arguments")
    env: list[str] = Field(
        default_factory=list,
        description="stdio: NAMES of environment variables passed through to the server (values never stored)",
    )
    cwd: str | None = Field(
        default=None, description="stdio: working directory, relative to the task file's folder (the default)"
    )
    url: str | None = Field(default=None, description="streamable HTTP: the server's endpoint URL")
    headers_env: dict[str, str] = Field(
        default_factory=dict,
        description="streamable HTTP: header name -> NAME of the variable holding its value",
    )
    tools: list[str] | None = Field(
        default=None, description="only these of the server's tools (default: all)"
    )
    timeout_s: float = Field(default=60.0, gt=0, description="per tool call")
    startup_timeout_s: float = Field(default=30.0, gt=0, description="to start and list the tools")
    max_concurrent_calls: int = Field(
        default=8,
        ge=1,
        description="calls in flight at once across all tasks; 1 for servers that cannot overlap",
    )

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerConfig:
        if (self.command is None) == (self.url is None):
            raise ValueError("give `command:` (stdio) or `url:` (streamable HTTP), not both")
        return self

    def key(self, base_dir: str) -> str:
        return base_dir + "\x00" + self.model_dump_json()

    def missing_env(self) -> list[str]:
        return [n for n in [*self.env, *self.headers_env.values()] if n not in os.environ]


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, BaseExceptionGroup) and e.exceptions:
        return _one_line(e.exceptions[0])
    return text.splitlines()[0][:300]


class McpConnection:
    """A running server: its tools, and calls through its session."""

    def __init__(self, name: str, config: McpServerConfig, base_dir: str = "."):
        self.name = name
        self.config = config
        self.base_dir = base_dir
        self.tools: list[Any] = []  # mcp.types.Tool
        self.dead: str | None = None  # why it can no longer be used
        self._client: Any = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._start_error: BaseException | None = None
        self._errlog = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        self._slots = asyncio.Semaphore(config.max_concurrent_calls)

    def _transport(self, stack: AsyncExitStack) -> Any:
        from mcp import StdioServerParameters
        from mcp.client.stdio import stdio_client
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        c = self.config
        if c.command is not None:
            cwd = os.path.join(self.base_dir, c.cwd) if c.cwd else self.base_dir
            params = StdioServerParameters(
                command=c.command, args=c.args, env={n: os.environ[n] for n in c.env}, cwd=cwd
            )
            return stdio_client(params, errlog=self._errlog)
        headers = {h: os.environ[v] for h, v in c.headers_env.items()}
        return streamable_http_client(c.url or "", http_client=create_mcp_http_client(headers=headers))

    async def _run(self) -> None:
        from mcp import Client

        try:
            async with AsyncExitStack() as stack:
                transport = self._transport(stack)
                # the handshake and listing get the startup allowance; each call its own timeout_s
                client = Client(transport, read_timeout_seconds=self.config.startup_timeout_s, mode="legacy")
                self._client = await stack.enter_async_context(client)
                listed = await self._client.list_tools()
                self.tools = [
                    t for t in listed.tools if self.config.tools is None or t.name in self.config.tools
                ]
                self._ready.set()
                await self._stop.wait()
        except BaseException as e:  # noqa: BLE001 - whatever ends the session ends this server
            if not self._ready.is_set():
                self._start_error = e
            self.dead = self.dead or f"mcp server '{self.name}' stopped: {self._why(e)}"
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self.dead = self.dead or f"mcp server '{self.name}' was stopped"
            self._ready.set()

    def _why(self, e: BaseException) -> str:
        self._errlog.flush()
        self._errlog.seek(0)
        tail = [ln.strip() for ln in self._errlog.read()[-4000:].splitlines() if ln.strip()]
        base = _one_line(e)
        return f"{base} (stderr: {tail[-1][:200]})" if tail else base

    async def start(self) -> None:
        missing = self.config.missing_env()
        if missing:
            raise McpError(f"mcp server '{self.name}': environment variable {missing[0]} is not set")
        self._runner = asyncio.create_task(self._run(), name=f"mcp:{self.name}")
        try:
            await asyncio.wait_for(self._ready.wait(), self.config.startup_timeout_s)
        except TimeoutError:
            await self.aclose()
            raise McpError(
                f"mcp server '{self.name}' did not start within {self.config.startup_timeout_s:g} s"
            ) from None
        if self._start_error is not None or self._client is None:
            why = self._why(self._start_error) if self._start_error else "no session"
            await self.aclose()
            raise McpError(f"mcp server '{self.name}' failed to start: {why}")

    async def call(self, tool: str, arguments: dict, ctx: ToolContext | None) -> ToolResult:
        if self.dead:
            return ToolResult.error(self.dead)
        async with self._slots:
            try:
                result = await asyncio.wait_for(
                    self._client.call_tool(tool, arguments, read_timeout_seconds=self.config.timeout_s),
                    self.config.timeout_s + 5,  # the SDK's own timeout first; this one if it hangs
                )
            except Exception as e:
                text = _one_line(e)
                if "timed out" in text.lower() or isinstance(e, TimeoutError):
                    return ToolResult.error(
                        f"mcp server '{self.name}': {tool} timed out after {self.config.timeout_s:g} s"
                    )
                if self._runner is not None and self._runner.done() or self.dead or "closed" in text.lower():
                    self.dead = self.dead or f"mcp server '{self.name}' is not running ({self._why(e)})"
                    return ToolResult.error(self.dead)
                return ToolResult.error(f"mcp server '{self.name}': {tool} failed: {text}")
        return _convert(result, f"{self.name}.{tool}", ctx)

    async def aclose(self) -> None:
        self._stop.set()
        if self._runner is not None and not self._runner.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._runner), 10)
            except (TimeoutError, Exception):  # noqa: BLE001 - stopping must not fail
                self._runner.cancel()
                try:
                    await self._runner
                except BaseException:  # noqa: BLE001
                    pass
        self._errlog.close()


def _convert(result: Any, where: str, ctx: ToolContext | None) -> ToolResult:
    """An MCP CallToolResult as a ToolResult: text joined, images into the ledger, isError kept."""
    texts: list[str] = []
    images: list[tuple[str, Any]] = []
    for part in result.content or []:
        kind = getattr(part, "type", None)
        if kind == "text":
            texts.append(part.text)
        elif kind == "image":
            ledger = ctx.images if ctx is not None else None
            if ledger is None:
                texts.append(f"[image {part.mime_type} not shown: this task has no image ledger]")
                continue
            try:
                from PIL import Image

                img = Image.open(io.BytesIO(base64.b64decode(part.data)))
                img.load()
                image_id = ledger.add(img, op=f"mcp:{where}")
            except Exception as e:  # a broken image is a note, not a crash
                texts.append(f"[image {part.mime_type} could not be decoded: {_one_line(e)}]")
                continue
            images.append((image_id, ledger.get(image_id)))
            texts.append(f"[new image {ledger.describe(image_id)}]")
        elif kind == "resource":
            res = part.resource
            body = getattr(res, "text", None)
            texts.append(
                f"[resource {res.uri}]\n{body}" if body is not None else f"[resource {res.uri} (binary)]"
            )
        elif kind == "resource_link":
            texts.append(f"[resource link {part.uri}: {part.name}]")
        else:
            texts.append(f"[{kind} content not shown]")
    if not texts and result.structured_content is not None:
        texts.append(json.dumps(result.structured_content, default=str))
    text = "\n".join(texts) if texts else "(no output)"
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"\n[... {len(text) - MAX_RESULT_CHARS} more characters ...]"
    error = bool(result.is_error)
    return ToolResult(
        f"error: {text}" if error else text, images, is_error=error, data=result.structured_content
    )


@dataclass
class McpToolSpec(ToolSpec):
    """A server's tool: its own JSON schema, arguments checked by the server."""

    connection: McpConnection | None = None
    remote_name: str = ""
    server: str = ""

    def validate(self, arguments: dict | str | None) -> dict:
        return self.parse(arguments)  # the server checks them against its schema

    async def invoke(self, arguments: dict | str | None, ctx: ToolContext | None = None) -> ToolResult:
        try:
            args = self.validate(arguments)
        except ToolError as e:
            return ToolResult.error(str(e))
        assert self.connection is not None
        return await self.connection.call(self.remote_name, args, ctx)


def specs_for(conn: McpConnection, taken: set[str]) -> list[McpToolSpec]:
    """The connection's tools as specs; a name already taken gets the server's name in front."""
    out = []
    for t in conn.tools:
        name = t.name if t.name not in taken else f"{conn.name}_{t.name}"
        schema = dict(t.input_schema or {"type": "object", "properties": {}})
        schema.setdefault("type", "object")
        schema.setdefault("properties", {})
        spec = McpToolSpec(
            name=name,
            description=(t.description or t.name).strip(),
            parameters=schema,
            fn=lambda **_: None,
            args_model=BaseModel,
            context_param="ctx",
            connection=conn,
            remote_name=t.name,
            server=conn.name,
        )
        taken.add(name)
        out.append(spec)
    return out


@dataclass
class McpPool:
    """Servers started once per run (per name, config and task folder) and shared by its tasks."""

    connections: dict[str, McpConnection] = field(default_factory=dict)
    _starting: dict[str, asyncio.Task] = field(default_factory=dict)

    async def connect(self, name: str, config: McpServerConfig, base_dir: str = ".") -> McpConnection:
        key = config.key(base_dir)
        if key not in self._starting:  # concurrent tasks wait on the same start
            conn = McpConnection(name, config, base_dir)
            self._starting[key] = asyncio.create_task(self._start(key, conn))
        return await asyncio.shield(self._starting[key])

    async def _start(self, key: str, conn: McpConnection) -> McpConnection:
        await conn.start()
        self.connections[key] = conn
        return conn

    async def tools_for(
        self, servers: dict[str, McpServerConfig], taken: set[str], base_dir: str = "."
    ) -> list[McpToolSpec]:
        specs: list[McpToolSpec] = []
        for name, config in servers.items():
            conn = await self.connect(name, config, base_dir)
            if conn.dead:
                raise McpError(conn.dead)
            specs += specs_for(conn, taken)
        return specs

    async def aclose(self) -> None:
        for t in self._starting.values():
            if not t.done():
                t.cancel()
        await asyncio.gather(*(c.aclose() for c in self.connections.values()), return_exceptions=True)
        for t in self._starting.values():  # collect failed starts' exceptions
            if t.done() and not t.cancelled():
                t.exception()
        self.connections.clear()
        self._starting.clear()
