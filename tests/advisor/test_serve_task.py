"""The project's own `provider: openai` endpoint pointed at `advisor serve` (the real server on
127.0.0.1, serving the shipped step-nano) runs a whole task; later steps read their prefix from the cache."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("uvicorn")

from advisor.engine.serving.server import load_served, running  # noqa: E402

from advisor import Advisor, load_task  # noqa: E402
from advisor.endpoints import make_endpoint  # noqa: E402
from advisor.endpoints.base import EndpointConfig  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart"


async def test_an_openai_endpoint_runs_the_quickstart_task_on_advisor_serve(tmp_path):
    served = load_served("step-nano", kv_blocks=1024)
    task = load_task(EXAMPLE / "task.yaml", check_env=False)
    with running(served) as base:
        cfg = EndpointConfig(
            provider="openai",
            model="step-nano",
            base_url=base + "/v1",
            free=True,
            max_tokens=256,
            vision=False,
        )
        endpoints = {"flash": make_endpoint("flash", cfg), "frontier": make_endpoint("frontier", cfg)}
        async with Advisor(runs_dir=tmp_path, endpoints=endpoints) as adv:
            result = await adv.run(task)
        for ep in endpoints.values():
            await ep.aclose()
    assert result.outcome in ("passed", "failed"), result  # the run ran to its end, no endpoint error
    assert result.steps >= 2
    executor = result.tokens["executor"]
    # every step after the first re-sends the conversation: the server's prefix cache served part of it
    assert executor["cached_input"] > 0 and executor["input"] > 0
    assert served.llm.core.stats.cached_prompt_tokens == sum(
        t.get("cached_input", 0) for t in result.tokens.values()
    )
