import asyncio
from pathlib import Path

from advisor.tools.spec import ToolContext, ToolResult, tool


@tool
def add(a: int, b: int = 2) -> int:
    """Add two integers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


@tool(name="where")
def where_am_i(ctx: ToolContext, suffix: str) -> str:
    """Report the workspace."""
    return str(ctx.workspace) + suffix


def test_schema_from_hints_and_docstring():
    s = add.openai_schema()["function"]
    assert s["name"] == "add"
    assert s["description"] == "Add two integers."
    assert s["parameters"]["properties"]["a"] == {"type": "integer", "description": "the first number"}
    assert s["parameters"]["required"] == ["a"]
    assert add.anthropic_schema()["input_schema"] == s["parameters"]


def test_context_hidden_and_injected(tmp_path: Path):
    assert "ctx" not in where_am_i.parameters["properties"]
    r = asyncio.run(where_am_i.invoke({"suffix": "/x"}, ToolContext(workspace=tmp_path)))
    assert r.text == str(tmp_path) + "/x" and not r.is_error


def test_validation_errors_name_the_field():
    r = asyncio.run(add.invoke({"a": "seven"}))
    assert r.is_error and "'a'" in r.text
    r = asyncio.run(add.invoke('{"a": 1, "c": 3}'))
    assert r.is_error and "'c'" in r.text
    r = asyncio.run(add.invoke("{not json"))
    assert r.is_error and "not valid JSON" in r.text
    r = asyncio.run(add.invoke({"a": 1}))
    assert isinstance(r, ToolResult) and r.text == "3" and r.data == 3
