"""Plain typed Python functions as model tools.

`@tool` turns a function into a `ToolSpec`: its JSON schema comes from the type hints (via pydantic)
and the parameter descriptions from the docstring, in both the OpenAI and the Anthropic shapes.
A parameter annotated `ToolContext` is injected by the caller and hidden from the model.
Sync functions run in a worker thread so CPU work never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import docstring_parser
from pydantic import BaseModel, ConfigDict, ValidationError, create_model


class ToolError(Exception):
    """An error the model should see as the tool's result (bad box, missing file, ...), not a crash."""


@dataclass
class ToolContext:
    """What a tool may touch: the task's workspace and its image ledger."""

    workspace: Path
    images: Any = None  # advisor.tools.images.ImageLedger, when the task has one
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolResult:
    """What a tool call gives back to the loop.

    `images` are (ledger id, PIL image) pairs the tool produced; the loop sends them to the model
    as image parts after the tool message.
    """

    text: str
    images: list[tuple[str, Any]] = field(default_factory=list)
    is_error: bool = False
    data: Any = None  # structured output for library users; not sent to the model

    @classmethod
    def error(cls, message: str) -> ToolResult:
        return cls(text=f"error: {message}", is_error=True)


def _describe(fn: Callable) -> tuple[str, dict[str, str]]:
    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    summary = "\n\n".join(x for x in (doc.short_description, doc.long_description) if x)
    return summary, {p.arg_name: p.description or "" for p in doc.params}


@dataclass
class ToolSpec:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    fn: Callable
    args_model: type[BaseModel]
    context_param: str | None = None
    # the tool may change the workspace (files, tests' outcome): after it succeeds, a call that failed
    # before is worth making again (the loop's repeated-call rule forgets earlier failures)
    changes_workspace: bool = False

    def openai_schema(self) -> dict:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def anthropic_schema(self) -> dict:
        return {"name": self.name, "description": self.description, "input_schema": self.parameters}

    def parse(self, arguments: dict | str | None) -> dict:
        """The arguments as a JSON object (a JSON string is decoded); a `ToolError` says what is wrong."""
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise ToolError(
                    f"{self.name}: arguments are not valid JSON ({e.msg} at position {e.pos})"
                ) from None
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ToolError(f"{self.name}: arguments must be a JSON object, got {type(arguments).__name__}")
        return arguments

    def validate(self, arguments: dict | str | None) -> dict:
        """Parse and check arguments; a `ToolError` names the offending field."""
        arguments = self.parse(arguments)
        try:
            model = self.args_model.model_validate(arguments)
        except ValidationError as e:
            problems = []
            for err in e.errors():
                where = ".".join(str(x) for x in err["loc"]) or "(arguments)"
                problems.append(f"'{where}': {err['msg']}")
            raise ToolError(f"{self.name}: invalid argument " + "; ".join(problems)) from None
        return {k: getattr(model, k) for k in type(model).model_fields}

    async def invoke(self, arguments: dict | str | None, ctx: ToolContext | None = None) -> ToolResult:
        """Validate, run (in a thread when sync) and wrap the result; tool errors become error results."""
        try:
            kwargs = self.validate(arguments)
            if self.context_param:
                kwargs[self.context_param] = ctx
            if inspect.iscoroutinefunction(self.fn):
                out = await self.fn(**kwargs)
            else:
                out = await asyncio.to_thread(self.fn, **kwargs)
        except ToolError as e:
            return ToolResult.error(str(e))
        return as_result(out)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def as_result(out: Any) -> ToolResult:
    if isinstance(out, ToolResult):
        return out
    if isinstance(out, str):
        return ToolResult(text=out)
    if isinstance(out, BaseModel):
        return ToolResult(text=out.model_dump_json(), data=out)
    try:
        return ToolResult(text=json.dumps(out, default=str), data=out)
    except (TypeError, ValueError):
        return ToolResult(text=str(out), data=out)


def tool(
    fn: Callable | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    changes_workspace: bool = False,
):
    """Decorator (bare or with arguments) that turns a typed function into a `ToolSpec`."""

    def build(f: Callable) -> ToolSpec:
        hints = get_type_hints(f, include_extras=True)  # keep Annotated[..., Field(ge=...)] constraints
        summary, param_docs = _describe(f)
        fields: dict[str, Any] = {}
        context_param = None
        for pname, param in inspect.signature(f).parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(f"tool {f.__name__}: *args/**kwargs cannot be described to a model")
            ann = hints.get(pname, Any)
            if ann is ToolContext:
                context_param = pname
                continue
            from pydantic import Field

            default = ... if param.default is param.empty else param.default
            fields[pname] = (ann, Field(default, description=param_docs.get(pname) or None))
        tool_name = name or f.__name__
        model = create_model(f"{tool_name}_args", __config__=ConfigDict(extra="forbid"), **fields)
        schema = model.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        schema.setdefault("properties", {})
        return ToolSpec(
            tool_name, description or summary or tool_name, schema, f, model, context_param, changes_workspace
        )

    return build(fn) if fn is not None else build
