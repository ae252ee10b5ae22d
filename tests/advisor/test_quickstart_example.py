"""The Quickstart task runs through the real tools (read_file, python) with scripted models."""

import csv
import re
from pathlib import Path

from advisor import Advisor, load_task
from advisor.endpoints import make_endpoint
from advisor.testing import Reply, ScriptedServer, ScriptedToolCall

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart"


def test_check_value_matches_the_files():
    prices = {r["item"]: float(r["unit_price_usd"]) for r in csv.DictReader(open(EXAMPLE / "prices.csv"))}
    order = (EXAMPLE / "order.txt").read_text()
    total = sum(prices[m[1]] * int(m[2]) for m in re.finditer(r"^(\w+) x (\d+)$", order, re.M))
    discount = float(re.search(r"(\d+)% off", order)[1]) / 100
    task = load_task(EXAMPLE / "task.yaml", check_env=False)
    assert task.check.value == f"{total * (1 - discount):.2f}"


async def test_quickstart_runs_with_real_tools(tmp_path: Path):
    code = (
        "import csv, re\n"
        "p = {r['item']: float(r['unit_price_usd']) for r in csv.DictReader(open('prices.csv'))}\n"
        "o = open('order.txt').read()\n"
        "t = sum(p[m[1]] * int(m[2]) for m in re.finditer(r'^(\\w+) x (\\d+)$', o, re.M))\n"
        "print(f'{t * 0.9:.2f}')\n"
    )

    def executor(req):
        tool_turns = [m for m in req["messages"] if m["role"] == "tool"]
        if len(tool_turns) == 2:
            return Reply(text=f"Answer: {re.findall(r'[0-9.]+', tool_turns[-1]['content'])[-1]}")
        if len(tool_turns) == 1:
            return Reply(tool_calls=[ScriptedToolCall("python", {"code": code})])
        return Reply(tool_calls=[ScriptedToolCall("read_file", {"path": "order.txt"})])

    task = load_task(EXAMPLE / "task.yaml", check_env=False)
    with ScriptedServer({"flash": executor, "frontier": ["APPROVE"]}) as server:
        endpoints = {
            "flash": make_endpoint("flash", server.endpoint_config("flash")),
            "frontier": make_endpoint("frontier", server.endpoint_config("frontier", "anthropic")),
        }
        async with Advisor(runs_dir=tmp_path, endpoints=endpoints) as adv:
            result = await adv.run(task)
        for ep in endpoints.values():
            await ep.aclose()
    assert result.outcome == "passed", result
    assert result.answer == "115.45" and result.consults == 1  # the final review
    assert (Path(result.out_dir) / "workspace" / "prices.csv").is_file()
