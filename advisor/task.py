"""task.yaml: the pydantic models, where endpoints come from, and one-line validation errors.

Every field is documented in docs/task-yaml.md. Endpoints are merged from (lowest first) the user's
config directory (`$ADVISOR_CONFIG_DIR` or `~/.config/advisor`)/advisor.yaml, an advisor.yaml beside the
task file, and the task's own `endpoints:` block.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from advisor.endpoints.base import EndpointConfig
from advisor.messages import Effort
from advisor.tools.mcp_client import McpServerConfig
from advisor.tools.spec import ToolSpec, tool

Trigger = Literal["plan", "replan", "final"]


class TaskError(Exception):
    """Bad input: one line naming the file, the field and what to do. The CLI exits 2 on it."""


ModelT = TypeVar("ModelT", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Inputs(_Strict):
    images: list[str] = Field(
        default_factory=list, description="image paths relative to the task file; become img_0, img_1, ..."
    )
    files: list[str] = Field(
        default_factory=list,
        description="file paths relative to the task file, copied into the task's workspace",
    )


class RoleConfig(_Strict):
    endpoint: str = Field(description="name of an endpoint under `endpoints:`")
    effort: Effort = Field(default="low", description="reasoning effort: low | medium | high")


FailureSignal = Literal["tool_error", "nonzero_exit", "repeated_call", "check_failed"]
FAILURE_SIGNALS: tuple[FailureSignal, ...] = ("tool_error", "nonzero_exit", "repeated_call", "check_failed")


class AdvisorTool(_Strict):
    """The `advisor` tool offered to the executor: it decides when to consult (advise mode, always)."""

    max_uses: int = Field(
        default=3, ge=0, description="calls per task; past it the tool answers an error and the task goes on"
    )
    max_tokens: int = Field(
        default=2048, gt=0, description="output cap of one piece of advice, also its price beforehand"
    )


class Escalation(_Strict):
    after_failures: int = Field(
        default=2, ge=1, description="consecutive failed executor steps before a consult"
    )
    at: list[Trigger] = Field(
        default_factory=list,
        description="inflection points: plan, replan (after a failed check), final (before accepting)",
    )
    mode: Literal["advise", "takeover", "restart"] = Field(
        default="advise",
        description=(
            "advise: guidance only; takeover: the frontier acts for takeover_steps steps in the executor's "
            "conversation; restart: the conversation starts over from the goal (the failed attempt dropped, "
            "workspace files kept) and the frontier takes its first takeover_steps steps"
        ),
    )
    max_consults: int = Field(default=3, ge=0, description="consults allowed per task")
    failure_signals: list[FailureSignal] = Field(
        default_factory=lambda: list(FAILURE_SIGNALS),
        description=(
            "what counts as a failed step: tool_error (a tool's error result, a malformed or unknown call), "
            "nonzero_exit (a command that exits non-zero), repeated_call (the same failing call again), "
            "check_failed (a rejected answer); a step whose only failures are signals left out neither "
            "counts nor resets the streak"
        ),
    )
    takeover_steps: int = Field(
        default=1, ge=1, description="steps the frontier acts for in takeover and restart modes"
    )
    advice_max_tokens: int = Field(
        default=1024, gt=0, description="output cap of one consult, also used to price it beforehand"
    )
    advisor_tool: AdvisorTool | None = Field(
        default=None,
        description=(
            "offer the executor a tool `advisor` (no arguments) that consults the frontier when the executor "
            "asks: {max_uses, max_tokens}; its consults count against max_consults and the budget like the others"
        ),
    )


class Workspace(_Strict):
    """Where the task's workspace starts from; the original is never touched."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: str | None = Field(
        default=None,
        alias="from",
        description="a folder (relative to the task file) copied into the workspace",
    )
    git: str | None = Field(
        default=None,
        description="PATH@REV: a local git repository (relative to the task file) cloned and checked out at REV",
    )

    @field_validator("git")
    @classmethod
    def _rev(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("git: give PATH@REV, e.g. ../myrepo@main")
        return v

    @model_validator(mode="after")
    def _one(self) -> Workspace:
        if (self.from_ is None) == (self.git is None):
            raise ValueError("give exactly one of `from: PATH` or `git: PATH@REV`")
        return self


class Shell(_Strict):
    """How `shell` commands and `command` checks are confined (see tools/README.md)."""

    sandbox: Literal["auto", "bwrap", "limits", "none"] = Field(
        default="auto",
        description=(
            "where shell and python code and command checks run: bwrap (a user namespace without "
            "capabilities, seccomp, the workspace the only writable path, no network), limits (an "
            "unprivileged uid and process limits, no file-system confinement), none (unconfined, "
            "warned), auto (bwrap where it runs, else limits); see docs/security.md"
        ),
    )
    network: bool = Field(default=False, description="bwrap: let commands use the network")
    memory_mb: int = Field(default=2048, gt=0, description="memory of a command's whole process tree")
    max_processes: int = Field(default=256, gt=0, description="processes a command may run at once")
    max_timeout_s: float = Field(
        default=600.0, gt=0, description="the longest timeout a shell call may ask for"
    )
    max_output_chars: int = Field(default=12_000, gt=100, description="per stream, what the model sees")

    def limits(self, timeout_s: float):
        from advisor.tools.commands import Limits

        return Limits(
            timeout_s=timeout_s,
            memory_mb=self.memory_mb,
            max_processes=self.max_processes,
            max_output_chars=self.max_output_chars,
            network=self.network,
        )

    def settings(self):
        """What the shell tool reads from its context."""
        from advisor.tools.shell import ShellSettings

        return ShellSettings(self.sandbox, self.limits(self.max_timeout_s), self.max_timeout_s)


class Budget(_Strict):
    max_usd: float = Field(default=1.0, ge=0, description="stop when the task's ledger reaches this many USD")
    max_steps: int = Field(default=40, ge=1, description="executor (or takeover) model calls")
    max_wall_s: float = Field(default=600.0, gt=0, description="wall-clock seconds for the whole task")
    max_repeated_failures: int = Field(
        default=3,
        ge=1,
        description=(
            "end the task as failed when one tool call (same tool, same arguments; an unknown tool: the same "
            "name) has failed this many times, counting its refused repeats"
        ),
    )


class Check(_Strict):
    type: Literal["equals", "contains", "regex", "python", "command", "none"] = Field(
        default="none", description="how the answer is verified"
    )
    run: str | None = Field(
        default=None,
        description="command: the command line; the task passes when it exits 0 in the workspace",
    )
    timeout_s: float = Field(default=300.0, gt=0, description="command: wall-clock limit of the check")
    value: str | None = Field(
        default=None, description="expected value (equals, contains) or pattern (regex)"
    )
    file: str | None = Field(default=None, description="python: a .py file beside the task")
    function: str = Field(
        default="check",
        description="python: the function in `file`, called as f(answer) -> bool | (bool, detail)",
    )
    ignore_case: bool = Field(
        default=False, description="equals / contains / regex: compare case-insensitively"
    )
    max_attempts: int = Field(default=3, ge=1, description="rejected answers before the task fails")

    @field_validator("value", mode="before")
    @classmethod
    def _stringify(cls, v: Any) -> Any:
        return v if v is None or isinstance(v, str) else str(v)


class Task(BaseModel):
    """One agent task. Load with `Task.from_yaml(path)` or build it in Python (tools may be functions)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(
        default="task",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="task name; also its output folder",
    )
    goal: str = Field(min_length=1, description="what the agent must do, and the answer format")
    inputs: Inputs = Field(default_factory=Inputs)
    tools: list[Any] = Field(
        default_factory=list, description="built-in tool names; from Python also functions or ToolSpecs"
    )
    executor: RoleConfig
    frontier: RoleConfig | None = Field(
        default=None, description="the consulted model; omit for an executor-only task"
    )
    escalation: Escalation = Field(default_factory=Escalation)
    budget: Budget = Field(default_factory=Budget)
    check: Check = Field(default_factory=Check)
    workspace: Workspace | None = Field(
        default=None, description="fill the workspace from a folder (`from:`) or a git revision (`git:`)"
    )
    shell: Shell = Field(default_factory=Shell)
    mcp_servers: dict[str, McpServerConfig] = Field(
        default_factory=dict,
        description="MCP tool servers by name (stdio `command` or streamable-HTTP `url`); their tools join `tools`",
    )
    endpoints: dict[str, EndpointConfig] = Field(default_factory=dict)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="<task>")

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[Any]) -> list[Any]:
        from advisor.tools.registry import BUILTIN

        for i, t in enumerate(v):
            if isinstance(t, str):
                if t not in BUILTIN:
                    raise ValueError(f"unknown tool '{t}' at tools[{i}]; known tools: {', '.join(BUILTIN)}")
            elif not (isinstance(t, ToolSpec) or callable(t)):
                raise ValueError(f"tools[{i}] must be a tool name, a function or a ToolSpec")
        return v

    @field_validator("mcp_servers")
    @classmethod
    def _server_names(cls, v: dict[str, McpServerConfig]) -> dict[str, McpServerConfig]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ValueError(f"mcp server name {name!r}: use letters, digits, _ and -")
        return v

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def source(self) -> str:
        return self._source

    def with_base(self, base_dir: Path, source: str) -> Task:
        self._base_dir, self._source = Path(base_dir), source
        return self

    def tool_specs(self) -> list[ToolSpec]:
        from advisor.tools.registry import BUILTIN

        specs: list[ToolSpec] = []
        for t in self.tools:
            specs.append(BUILTIN[t] if isinstance(t, str) else t if isinstance(t, ToolSpec) else tool(t))
        return specs

    def input_paths(self, kind: Literal["images", "files"]) -> list[Path]:
        return [(self._base_dir / p) for p in getattr(self.inputs, kind)]

    @classmethod
    def from_yaml(cls, path: str | Path, *, check_env: bool = True) -> Task:
        return load_task(path, check_env=check_env)

    def validate_ready(
        self,
        *,
        check_env: bool = True,
        strategies: tuple[str, ...] = ("advisor",),
        given: Collection[str] = (),
    ) -> None:
        """Checks that need the outside world: files exist, endpoints are named and priced, keys are set.

        `given`: endpoint names the caller supplies ready-made, whose key variables are not checked.
        """
        src = self._source
        for kind in ("images", "files"):
            for i, p in enumerate(self.input_paths(kind)):  # type: ignore[arg-type]
                if not p.is_file():
                    raise TaskError(
                        f"{src}: inputs.{kind}[{i}]: file not found: {p} (paths are relative to the task file)"
                    )
        if self.check.type == "python":
            if not self.check.file:
                raise TaskError(
                    f"{src}: check.file: a python check needs `file:` (a .py file beside the task)"
                )
            if not (self._base_dir / self.check.file).is_file():
                raise TaskError(f"{src}: check.file: file not found: {self._base_dir / self.check.file}")
        elif self.check.type == "command":
            if not (self.check.run or "").strip():
                raise TaskError(f"{src}: check.run: a command check needs `run:` (e.g. run: pytest -q)")
        elif self.check.type != "none" and self.check.value is None:
            raise TaskError(f"{src}: check.value: a {self.check.type} check needs `value:`")
        self._validate_workspace()
        for name, server in self.mcp_servers.items():
            missing = server.missing_env() if check_env else []
            if missing:
                raise TaskError(
                    f"{src}: mcp_servers.{name}: environment variable {missing[0]} is not set; export {missing[0]}=..."
                )
        if self.check.type == "command" or {"shell", "python"} & {t.name for t in self.tool_specs()}:
            from advisor.tools.commands import SandboxUnavailable, require_sandbox

            try:
                require_sandbox(self.shell.sandbox)
            except SandboxUnavailable as e:
                raise TaskError(f"{src}: shell.sandbox: {e}") from None
        used = {"executor": self.executor}
        if self.frontier is not None:
            used["frontier"] = self.frontier
        elif "frontier" in strategies:
            raise TaskError(f"{src}: frontier: the frontier strategy needs a `frontier:` endpoint")
        for role, rc in used.items():
            cfg = self.endpoints.get(rc.endpoint)
            if cfg is None:
                known = ", ".join(self.endpoints) or "none"
                raise TaskError(
                    f"{src}: {role}.endpoint: unknown endpoint '{rc.endpoint}' (known: {known}); "
                    "define it under `endpoints:` here, in advisor.yaml beside the task, or in your config directory"
                )
            where = f"endpoints.{rc.endpoint}"
            if cfg.price is None and not cfg.free:
                raise TaskError(
                    f"{src}: {where}.price: endpoint has no price; add price: {{input, cached_input, output}} "
                    "(USD per million tokens) or set free: true on purpose"
                )
            if (
                check_env
                and rc.endpoint not in given
                and cfg.api_key_env
                and not os.environ.get(cfg.api_key_env)
            ):
                raise TaskError(
                    f"{src}: {where}.api_key_env: environment variable {cfg.api_key_env} is not set; "
                    f"export {cfg.api_key_env}=... (keys are never read from files)"
                )

    def workspace_source(self) -> tuple[str, Path, str | None] | None:
        """("from", folder, None) or ("git", repository, rev), paths resolved against the task file."""
        ws = self.workspace
        if ws is None:
            return None
        if ws.from_ is not None:
            return "from", self._base_dir / ws.from_, None
        from advisor.workspace import split_git

        path, rev = split_git(ws.git or "")
        return "git", self._base_dir / path, rev

    def _validate_workspace(self) -> None:
        source = self.workspace_source()
        if source is None:
            return
        kind, path, rev = source
        where = f"{self._source}: workspace.{kind}"
        if not path.is_dir():
            raise TaskError(f"{where}: folder not found: {path} (paths are relative to the task file)")
        if kind == "git":
            from advisor.workspace import resolve_rev

            if resolve_rev(path, rev or "HEAD") is None:
                raise TaskError(f"{where}: {path} is not a git repository with a revision {rev!r}")


def user_config_dir() -> Path:
    env = os.environ.get("ADVISOR_CONFIG_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "advisor"


def read_yaml(path: Path) -> Any:
    """The YAML file at `path`, parsed; a one-line TaskError naming the file (and the line and column of
    a syntax error) when it cannot be read or is not YAML. What task, suite, endpoint and price files
    are read with."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TaskError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TaskError(f"{path}:{where}: invalid YAML: {problem}") from None


CONFIG_KEYS = {"endpoints", "otel"}  # what an advisor.yaml holds


def config_otel(paths: list[Path]) -> Any:
    """The `otel:` setting of the first of these advisor.yaml files that has one (None: none has)."""
    for path in paths:
        if path.is_file():
            data = read_yaml(path)
            if isinstance(data, dict) and data.get("otel") is not None:
                return data["otel"]
    return None


def read_endpoints(path: Path) -> dict[str, Any]:
    """The endpoints an advisor.yaml at `path` defines (name -> EndpointConfig), {} when there is none."""
    if not path.is_file():
        return {}
    data = read_yaml(path) or {}
    if not isinstance(data, dict) or set(data) - CONFIG_KEYS:
        extra = ", ".join(sorted(set(data) - CONFIG_KEYS)) if isinstance(data, dict) else type(data).__name__
        raise TaskError(
            f"{path}: unexpected content ({extra}); advisor.yaml holds only `endpoints:` and `otel:`"
        )
    eps = data.get("endpoints") or {}
    if not isinstance(eps, dict):
        raise TaskError(f"{path}: endpoints: must be a mapping of name -> endpoint")
    try:
        return {k: EndpointConfig.model_validate(v) for k, v in eps.items()}
    except ValidationError as e:
        raise TaskError(one_line_error(path, e, prefix="endpoints")) from None


def one_line_error(path: Path | str, e: ValidationError, prefix: str = "") -> str:
    """A pydantic error as one line: the file, then each problem's key path under `prefix` and what to do
    about it (all of them: a user fixing the first should not meet the second on the next run)."""
    return f"{path}: " + "; ".join(_problem(err, prefix) for err in e.errors())


def _problem(err: dict, prefix: str) -> str:
    loc = ".".join(str(x) for x in ((prefix,) if prefix else ()) + tuple(err["loc"]))
    kind = err["type"]
    if kind == "extra_forbidden":
        hint = "unknown key; remove it or fix its spelling (see docs/task-yaml.md)"
    elif kind == "missing":
        hint = "required; add it"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        hint = f"{msg}{shown}"
    return f"{loc or '(top level)'}: {hint}"


def with_config_endpoints(path: Path, data: dict) -> dict:
    """`data` (a task.yaml or proxy.yaml mapping) with the endpoints of the user's advisor.yaml and the one
    beside `path` below its own `endpoints:`."""
    endpoints: dict[str, Any] = {}
    endpoints.update(read_endpoints(user_config_dir() / "advisor.yaml"))
    endpoints.update(read_endpoints(path.parent / "advisor.yaml"))
    own = data.get("endpoints") or {}
    if not isinstance(own, dict):
        raise TaskError(f"{path}: endpoints: must be a mapping of name -> endpoint")
    return {**data, "endpoints": {**{k: v.model_dump() for k, v in endpoints.items()}, **own}}


def load_config_file(path: Path, model: type[ModelT], *, what: str, mapping: str) -> ModelT:
    """A YAML file validated as `model`, with the endpoints of an advisor.yaml beside it merged in; every
    failure is a one-line TaskError naming the file (`what` is not found, it is not `mapping`, a field)."""
    if not path.is_file():
        raise TaskError(f"{path}: {what} not found")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise TaskError(f"{path}: {mapping}")
    data = with_config_endpoints(path, data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise TaskError(one_line_error(path, e)) from None


def load_task(
    path: str | Path, *, check_env: bool = True, strategies: tuple[str, ...] = ("advisor",)
) -> Task:
    path = Path(path)
    task = load_config_file(
        path, Task, what="task file", mapping="a task file must be a YAML mapping (name, goal, executor, ...)"
    )
    task.with_base(path.parent.resolve(), str(path))
    task.validate_ready(check_env=check_env, strategies=strategies)
    return task


ToolLike = str | ToolSpec | Callable[..., Any]
