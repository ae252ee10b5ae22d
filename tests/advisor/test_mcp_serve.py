"""`advisor mcp`: an MCP client (the official SDK's) hands a task to an Advisor-Mode loop over stdio."""

import json
import os
import sys
from pathlib import Path

import yaml
from mcp import Client, StdioServerParameters

from advisor.testing import ScriptedServer

ROOT = Path(__file__).resolve().parents[2]


async def test_run_task_over_stdio(tmp_path):
    with ScriptedServer({"flash": ["Answer: 42", "Answer: 42"]}) as server:
        task = {
            "name": "answer",
            "goal": "Say 42.",
            "executor": {"endpoint": "flash"},
            "check": {"type": "equals", "value": "42"},
            "endpoints": {"flash": server.endpoint_config("flash").model_dump(exclude_none=True)},
        }
        (tmp_path / "task.yaml").write_text(yaml.safe_dump(task))
        params = StdioServerParameters(
            command=sys.executable,
            args=["-m", "advisor.cli", "mcp", "--runs-dir", str(tmp_path / "runs")],
            cwd=str(tmp_path),
            env={"PYTHONPATH": str(ROOT), **{k: os.environ[k] for k in ("PATH",) if k in os.environ}},
        )
        async with Client(params, mode="legacy") as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert set(tools["run_task"].input_schema["properties"]) == {"task_file", "strategy"}
            r = await client.call_tool("run_task", {"task_file": "task.yaml"})
            bad = await client.call_tool("run_task", {"task_file": "missing.yaml"})
            worse = await client.call_tool("run_task", {"task_file": "task.yaml", "strategy": "magic"})
    assert not r.is_error
    result = (
        r.structured_content if "outcome" in (r.structured_content or {}) else json.loads(r.content[0].text)
    )
    assert result["outcome"] == "passed" and result["answer"] == "42" and result["steps"] == 1
    assert (Path(result["out_dir"]) / "result.json").is_file()
    assert bad.is_error and "task file not found" in bad.content[0].text
    assert worse.is_error and "unknown strategy 'magic'" in worse.content[0].text
