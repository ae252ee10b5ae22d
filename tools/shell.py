"""The `shell` tool: a bash command line in the task workspace, confined (see advisor.tools.commands)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from advisor.tools.commands import Limits, SandboxUnavailable, format_result, run_command
from advisor.tools.spec import ToolContext, ToolError, ToolResult, tool
from advisor.tools.workspace import workspace_of

DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ShellSettings:
    """A task's `shell:` block as the tools see it (in `ctx.extra["shell"]`)."""

    sandbox: str = "auto"
    limits: Limits = Limits()
    max_timeout_s: float = 600.0


def settings_of(ctx: ToolContext | None) -> ShellSettings:
    extra = ctx.extra if ctx is not None else {}
    got = extra.get("shell")
    return got if isinstance(got, ShellSettings) else ShellSettings()


def command_data(r) -> dict:
    """The structured part of a command's result, kept in the trace."""
    return {
        "exit_code": r.exit_code,
        "timed_out": r.timed_out,
        "killed": r.killed,
        "wall_s": r.wall_s,
        "stdout_omitted_chars": r.stdout_omitted,
        "stderr_omitted_chars": r.stderr_omitted,
        "sandbox": r.sandbox,
    }


@tool(name="shell", changes_workspace=True)
async def shell_tool(ctx: ToolContext, command: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> ToolResult:
    """Run a bash command line in the task workspace (e.g. `pytest -q`, `ls src`, `git diff`) and return its exit code, stdout and stderr.

    Each call is a fresh shell whose working directory is the workspace; long output keeps its head
    and tail. The network is off unless the task allows it.

    Args:
        command: the command line, run with bash -c
        timeout_s: wall-clock limit in seconds; the command and everything it started are killed after it
    """
    workspace = workspace_of(ctx)
    if not command.strip():
        raise ToolError("command is empty")
    if not (timeout_s > 0):
        raise ToolError(f"timeout_s must be positive, got {timeout_s}")
    s = settings_of(ctx)
    limits = replace(s.limits, timeout_s=min(timeout_s, s.max_timeout_s))
    try:
        r = await run_command(command, workspace, sandbox=s.sandbox, limits=limits)  # type: ignore[arg-type]
    except SandboxUnavailable as e:
        raise ToolError(str(e)) from None
    return ToolResult(format_result(r, limits), is_error=not r.ok, data=command_data(r))
