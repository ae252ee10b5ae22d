"""advisor: Advisor-Mode agent loops with a cheap executor, frontier consults and a cost ledger.

    from advisor import Advisor, Task, tool

Public names are imported lazily, so importing a leaf module such as `advisor.messages` (or using the
HTTP endpoints alone) does not pull in the whole loop and its tools.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from advisor.result import TaskResult
    from advisor.runner import Advisor
    from advisor.task import Task, TaskError, load_task
    from advisor.tools.spec import ToolContext, ToolResult, tool

__all__ = ["Advisor", "Task", "TaskError", "TaskResult", "ToolContext", "ToolResult", "load_task", "tool"]

_LAZY = {
    "Advisor": "advisor.runner",
    "Task": "advisor.task",
    "TaskError": "advisor.task",
    "load_task": "advisor.task",
    "TaskResult": "advisor.result",
    "ToolContext": "advisor.tools.spec",
    "ToolResult": "advisor.tools.spec",
    "tool": "advisor.tools.spec",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'advisor' has no attribute {name!r}")
