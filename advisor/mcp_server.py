"""`advisor mcp`: an MCP server (stdio) whose `run_task` tool hands a task.yaml to an Advisor-Mode loop.

An MCP client (an IDE, another agent) calls `run_task(task_file, strategy)` and gets the task's result:
outcome, answer, steps, consults, cost, the workspace diff and where the outputs are. One `Advisor` serves
every call, so endpoints and MCP servers the tasks use start once and concurrent calls share them.
"""

from __future__ import annotations

import argparse
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from advisor.runner import STRATEGIES, Advisor
from advisor.task import TaskError, load_task


def build_server(runs_dir: Path) -> Any:
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError  # its message reaches the client; others are hidden

    state: dict[str, Advisor] = {}

    @asynccontextmanager
    async def lifespan(_server):
        async with Advisor(runs_dir=runs_dir) as adv:
            state["advisor"] = adv
            yield {}

    app = MCPServer(
        "advisor",
        instructions="Runs agent tasks (task.yaml files) in Advisor Mode and reports what each cost.",
        lifespan=lifespan,
    )

    @app.tool()
    async def run_task(task_file: str, strategy: str = "advisor") -> dict:
        """Run a task.yaml in Advisor Mode (a cheap executor, frontier consults) and return its result.

        Args:
            task_file: path of the task.yaml (relative to the server's working directory)
            strategy: advisor (the task's escalation policy), executor (no consults) or frontier (alone)
        """
        if strategy not in STRATEGIES:
            raise ToolError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        try:
            task = load_task(task_file, strategies=(strategy,))
        except TaskError as e:
            raise ToolError(str(e)) from None
        result = await state["advisor"].run(task, strategy)
        out = result.to_dict()
        out["out_dir"] = result.out_dir
        return out

    return app


def cmd_mcp(args: argparse.Namespace) -> int:
    build_server(args.runs_dir).run()  # stdio until the client closes it
    return 0


def add_mcp_parser(sub: Any) -> None:
    p = sub.add_parser("mcp", help="serve run_task as an MCP tool over stdio (for MCP clients)")
    p.add_argument(
        "--runs-dir", type=Path, default=Path("runs"), help="where task outputs go (default: runs)"
    )
    p.set_defaults(func=cmd_mcp)
