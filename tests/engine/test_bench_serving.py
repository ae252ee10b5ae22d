"""advisor.engine.bench_serving runs end to end on a tiny model (a smoke test of the harness; no timings checked)."""

from __future__ import annotations

import asyncio

from advisor.engine import LLM
from advisor.engine.bench_serving import bench_core, bench_static, report

from tests.engine.step_models import TEXT_A, build_reference, save_reference


def test_the_workload_runs_on_both_engines_and_the_core_reuses_the_prefixes(tmp_path):
    llm = LLM.from_pretrained(save_reference(build_reference(TEXT_A, seed=1), tmp_path / "ckpt"))
    core = asyncio.run(bench_core(llm, loops=3, steps=3, new=4, seed=0, num_blocks=512, chunk=64))
    static = asyncio.run(bench_static(llm, loops=3, steps=3, new=4, batch=2, seed=0))
    assert core.prompt_sent == static.prompt_sent and core.generated == static.generated == 3 * 3 * 4
    # later steps re-send the conversation: the core computes far less of it than it is sent
    assert core.cached > 0 and core.prompt_computed + core.cached == core.prompt_sent
    assert static.prompt_computed >= static.prompt_sent
    # new: the first prompts whole, then only what the loop appended besides the model's own output
    assert core.prompt_new == static.prompt_new < core.prompt_sent
    assert core.prompt_computed < core.prompt_new  # the shared system prompt computed once
    table = report(static, core)
    assert "p99 time to first token" in table and "prefix hit rate" in table and "computed / new" in table
