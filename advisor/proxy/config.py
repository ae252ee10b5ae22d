"""proxy.yaml: which endpoint plays each role, the escalation and budget blocks of task.yaml (plus what
a proxy needs: failure patterns, a per-day budget), and where sessions live.

Endpoints are merged exactly as for a task: the user's config directory's advisor.yaml, an advisor.yaml
beside proxy.yaml, then proxy.yaml's own `endpoints:`. Errors are one line naming the file and field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, field_validator

from advisor.endpoints.base import EndpointConfig
from advisor.task import (
    Escalation,
    RoleConfig,
    TaskError,
    _Strict,
    load_config_file,
)

ProxyTrigger = Literal["plan", "new_user_turn"]

# what a harness's tool output looks like when the tool failed (a shell, a test runner, a compiler)
DEFAULT_ERROR_PATTERNS = [
    r"(?i)\bexit(ed)?( with)?( code| status)[ :=]*[1-9]\d*",
    r"(?i)\breturn code[ :=]*[1-9]\d*",
    r"Traceback \(most recent call last\)",
    r"(?m)^(FAILED|ERROR)\b",
    r"(?i)\b[1-9]\d* (failed|errors?)\b",
    r"(?im)^\s*error(\[\w+\])?:",
    r"(?i)\bcommand not found\b",
    r"(?i)\bno such file or directory\b",
]
# what a user says when the last answer was wrong
DEFAULT_WRONG_PATTERNS = [
    r"(?i)\b(that'?s|this is|it'?s|still) (wrong|incorrect|not right|broken)\b",
    r"(?i)\b(doesn'?t|does not|didn'?t|did not) work\b",
    r"(?i)\bstill (fails|failing|broken|crashes)\b",
    r"(?i)^\s*(no|wrong|nope)[.!,]",
]


class ProxyEscalation(Escalation):
    """task.yaml's `escalation:` block; its inflection points are the proxy's: `plan` (a session's first
    request) and `new_user_turn` (a request whose newest message is the user's, not a tool result)."""

    at: list[ProxyTrigger] = Field(  # type: ignore[assignment]
        default_factory=list, description="inflection points: plan, new_user_turn"
    )
    mode: Literal["advise", "takeover"] = Field(  # type: ignore[assignment]
        default="advise",
        description="advise: the frontier's advice is inserted for the executor; takeover: the frontier answers the next takeover_steps requests",
    )
    advisor_tool: None = Field(  # type: ignore[assignment]
        default=None,
        description="not set in proxy.yaml: a client offers the advisor tool in its request (tools: advisor_20260301)",
    )
    error_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ERROR_PATTERNS),
        description="regexes: a tool result matching one is a failure (besides Anthropic's is_error)",
    )
    wrong_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_WRONG_PATTERNS),
        description="regexes: a user turn matching one says the last answer was wrong (a failure)",
    )

    @field_validator("error_patterns", "wrong_patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for i, p in enumerate(v):
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"[{i}] is not a valid regex ({e})") from None
        return v


class ProxyBudget(_Strict):
    max_usd: float = Field(default=1.0, ge=0, description="USD per session; then requests are refused")
    max_usd_per_day: float | None = Field(
        default=None, ge=0, description="USD per UTC day over all sessions (none: no daily cap)"
    )


class Sessions(_Strict):
    dir: str = Field(default="proxy-sessions", description="journal directory, relative to proxy.yaml")
    ttl_s: float = Field(default=7 * 86400, gt=0, description="a session idle this long expires")
    max_sessions: int = Field(default=10000, ge=1, description="beyond this the least recently used expire")
    fsync: bool = Field(
        default=True, description="fsync the journal in a background thread, at most every 50 ms"
    )
    responses_kept: int = Field(
        default=1000,
        ge=0,
        description="Responses API: the last N responses kept in memory for previous_response_id (LRU)",
    )


class Auth(_Strict):
    """Who may use the proxy: the master key (from an environment variable, never the file) administers
    and may call every route; virtual keys (`advisor proxy keys create`) are for people and services."""

    master_key_env: str = Field(description="environment variable holding the master key")
    pepper_env: str | None = Field(
        default=None,
        description="environment variable holding the secret mixed into virtual keys' hashes (default: derived from the master key, so rotating it invalidates the virtual keys)",
    )
    refresh_s: float = Field(
        default=2.0, gt=0, description="how often a replica re-reads the keys (revocations, budgets)"
    )


class Storage(_Strict):
    """Where keys, spend and call records live: SQLite under sessions.dir by default; PostgreSQL for
    replicas (`url_env` names the variable with postgresql://...; a URL never sits in the file)."""

    url_env: str | None = Field(
        default=None, description="environment variable with the database URL (postgresql://...)"
    )
    file: str = Field(default="proxy.db", description="the SQLite file in sessions.dir when url_env is unset")
    stale_replica_s: float = Field(
        default=30.0,
        gt=0,
        description="a replica silent this long is dead: its calls in flight are booked at their estimate",
    )


class ProxyConfig(_Strict):
    """A loaded proxy.yaml. Load with `load_proxy_config(path)`."""

    models: list[str] = Field(
        default_factory=lambda: ["advisor"],
        description="model names clients may ask for (shell-style patterns, e.g. claude-*); all get Advisor Mode",
    )
    executor: RoleConfig
    frontier: RoleConfig | None = None
    escalation: ProxyEscalation = Field(default_factory=ProxyEscalation)
    budget: ProxyBudget = Field(default_factory=ProxyBudget)
    sessions: Sessions = Field(default_factory=Sessions)
    auth: Auth | None = Field(
        default=None, description="keys (none: the proxy answers anyone; loopback only)"
    )
    storage: Storage = Field(default_factory=Storage)
    max_request_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="a larger request body is refused with a 413"
    )
    endpoints: dict[str, EndpointConfig] = Field(default_factory=dict)
    advisor_models: dict[str, str] = Field(
        default_factory=dict,
        description="the advisor tool's `model` (as a client sends it) -> the endpoint that advises; others: the frontier role",
    )
    upstream_pools: int = Field(
        default=8, ge=1, description="connection pools per upstream endpoint (sessions spread over them)"
    )
    upstream_stream: bool = Field(
        default=False,
        description="stream non-streamed client requests from OpenAI-compatible upstreams too (the reply is the same)",
    )
    upstream_client: Literal["auto", "httptools", "aiohttp", "httpx"] = Field(
        default="auto",
        description="HTTP client for the upstream calls: httptools (plain http:// only) costs a tenth of aiohttp's CPU per call, aiohttp a fraction of httpx's; auto: httptools for http:// upstreams no environment proxy covers, else aiohttp when installed (pip install 'advisor[proxy]'), else httpx",
    )

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def sessions_dir(self) -> Path:
        return self._base_dir / self.sessions.dir


def check_ready(cfg: ProxyConfig, source: str) -> None:
    """Each role's endpoint, and each advisor model's, exists and is priced (as a task's are)."""
    used = [
        (f"{role}.endpoint", rc.endpoint)
        for role, rc in (("executor", cfg.executor), ("frontier", cfg.frontier))
        if rc is not None
    ]
    used += [(f"advisor_models.{model}", name) for model, name in cfg.advisor_models.items()]
    for where, name in used:
        ep = cfg.endpoints.get(name)
        if ep is None:
            known = ", ".join(cfg.endpoints) or "none"
            raise TaskError(f"{source}: {where}: unknown endpoint '{name}' (known: {known})")
        if ep.price is None and not ep.free:
            raise TaskError(
                f"{source}: endpoints.{name}.price: endpoint has no price; add price: "
                "{input, cached_input, output} (USD per million tokens) or set free: true on purpose"
            )


def check_keys(cfg: ProxyConfig, source: str) -> None:
    """Each role's API key variable is set, and the master key's and database URL's when configured
    (checked when the proxy starts, not at its first request)."""
    import os

    needed = []
    if cfg.auth is not None:
        needed.append(("auth.master_key_env", cfg.auth.master_key_env))
        if cfg.auth.pepper_env:
            needed.append(("auth.pepper_env", cfg.auth.pepper_env))
    if cfg.storage.url_env:
        needed.append(("storage.url_env", cfg.storage.url_env))
    for field_name, env in needed:
        if not os.environ.get(env):
            raise TaskError(
                f"{source}: {field_name}: environment variable {env} is not set; export {env}=..."
            )
    names = [rc.endpoint for rc in (cfg.executor, cfg.frontier) if rc is not None]
    for name in [*names, *cfg.advisor_models.values()]:
        env = cfg.endpoints[name].api_key_env
        if env and not os.environ.get(env):
            raise TaskError(
                f"{source}: endpoints.{name}.api_key_env: environment variable {env} is not set; "
                f"export {env}=... (keys are never read from files)"
            )


def load_proxy_config(path: str | Path) -> ProxyConfig:
    path = Path(path)
    cfg = load_config_file(
        path,
        ProxyConfig,
        what="proxy config",
        mapping="proxy.yaml must be a YAML mapping (executor, frontier, endpoints, ...)",
    )
    cfg._base_dir = path.parent.resolve()
    check_ready(cfg, str(path))
    return cfg
