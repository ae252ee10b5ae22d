"""advisor: Advisor-Mode agent loops with a cheap executor, frontier consults and a cost ledger.

from advisor import Advisor, Task, tool
"""

from advisor.result import TaskResult
from advisor.runner import Advisor
from advisor.task import Task, TaskError, load_task
from tools.spec import ToolContext, ToolResult, tool

__all__ = ["Advisor", "Task", "TaskError", "TaskResult", "ToolContext", "ToolResult", "load_task", "tool"]
