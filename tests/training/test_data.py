"""Training samples are exactly what the embedded endpoint renders, and parse back into the scripted turns."""

from __future__ import annotations

import json

import pytest
from advisor.engine.text.tokenizer import load_tokenizer
from advisor.tools.registry import resolve

from advisor.endpoints import make_endpoint
from advisor.endpoints.base import EndpointConfig
from advisor.endpoints.embedded import Generation
from training.tasks import FAMILIES, generate
from training.traces import encode_sample, initial_messages, samples


def test_generators_are_seeded_and_verifiable():
    a, b = list(generate(9, seed=5)), list(generate(9, seed=5))
    assert [(t.goal, t.answer, t.files) for t in a] == [(t.goal, t.answer, t.files) for t in b]
    assert {t.family for t in a} == set(FAMILIES)
    assert [t.goal for t in generate(9, seed=6)] != [t.goal for t in a]
    with pytest.raises(ValueError, match="unknown task families"):
        next(generate(1, 0, ("nope",)))


def test_traces_hold_real_tool_results(traces):
    for tr in traces:
        roles = [m.role for m in tr.messages]
        assert roles[:2] == ["system", "user"] and roles[-1] == "assistant"
        final = tr.messages[-1]
        assert final.text == f"Answer: {tr.task.answer}" and not final.tool_calls
        results = [m.text for m in tr.messages if m.role == "tool"]
        assert results and not any(m.is_error for m in tr.messages if m.role == "tool")
        if tr.task.family in ("arith", "order"):  # the python tool really ran the code
            assert results[-1].strip() == tr.task.answer
        if tr.task.family == "lookup":
            assert results[0] == next(iter(tr.task.files.values()))


def test_samples_have_the_step_shape(traces, boot_tokenizer):
    tr = next(t for t in traces if t.task.family == "order")
    ss = samples(tr, boot_tokenizer)
    assert len(ss) == 3
    for s in ss:
        assert s.prompt.startswith("<|im_start|>system\n") and "<tools>\n" in s.prompt
        assert "Reasoning: low" in s.prompt
        assert s.prompt.endswith("<|im_start|>assistant\n<think>\n")
        assert s.target.endswith("<|im_end|>") and s.target.count("<|im_end|>") == 1
        assert "\n</think>\n" in s.target
    assert s.target == f"The total is {tr.task.answer}.\n</think>\nAnswer: {tr.task.answer}<|im_end|>"
    assert ss[0].target.count("<tool_call>\n<function=read_file>\n<parameter=path>\n") == 2
    # the next turn's prompt holds the previous turn as sent back (no reasoning) and the tool responses
    assert "<think>\n\n</think>\n<tool_call>" in ss[1].prompt
    assert "<|im_start|>tool_response\n<tool_response>Order\n" in ss[1].prompt


async def test_prompt_and_target_match_the_embedded_endpoint(traces, tok_dir, init_dir, monkeypatch):
    """For every turn: the endpoint, given the trace's messages, encodes exactly the sample's prompt ids;
    fed the sample's target as the model output, it parses back the scripted reasoning, calls and answer."""
    tok = load_tokenizer(tok_dir)
    ep = make_endpoint("flash", EndpointConfig(provider="embedded", model=str(init_dir), free=True))
    await ep._get_engine()
    seen: dict = {}

    def scripted(prompt, max_new, *args):
        seen["prompt"] = prompt
        return Generation(tok.encode(seen["target"]), 0)

    monkeypatch.setattr(ep._engine, "generate", scripted)
    checked = 0
    for tr in traces:
        specs = resolve(tr.task.tools)
        ss = iter(samples(tr, tok))
        for i, msg in enumerate(tr.messages):
            if msg.role != "assistant":
                continue
            s = next(ss)
            seen["target"] = s.target
            resp = await ep.complete(tr.messages[:i], tools=specs, effort=tr.effort)
            ids, labels = encode_sample(tok, s)
            assert seen["prompt"] == ids[: labels.count(-100)]
            assert tok.decode(seen["prompt"]) == s.prompt
            assert (resp.message.reasoning or "") == (msg.reasoning or "")
            assert resp.message.text == msg.text
            assert [(c.name, c.arguments) for c in resp.message.tool_calls] == [
                (c.name, c.arguments) for c in msg.tool_calls
            ]
            checked += 1
    assert checked == sum(len(t.task.turns) for t in traces)


def test_initial_messages_are_the_loops(traces):
    tr = traces[0]
    system, user = initial_messages(tr.task)
    assert "Answer: <the answer only>" in system.text and ", ".join(tr.task.tools) in system.text
    assert user.text.startswith(tr.task.goal.strip())
    # nothing task-specific in the system prompt: tasks with the same tools share it (and its tokens)
    same_tools = [t for t in traces if t.task.tools == tr.task.tools and t.task.name != tr.task.name]
    assert same_tools and tr.task.name not in system.text
    assert initial_messages(same_tools[0].task)[0].text == system.text


def test_eval_suite_families_are_scripted_with_their_own_answers():
    """The advisor.evals.families tasks (same goal, files, tools, answer as the eval suite) play out with real
    tools to the suite's expected answer; training seeds stay clear of the suites' small seeds."""
    import asyncio

    from advisor.evals.families import spec

    from training.tasks import EVAL_FAMILIES, EVAL_SEED_BASE
    from training.traces import run_traces

    tasks = list(generate(len(EVAL_FAMILIES), seed=0, families=EVAL_FAMILIES))
    assert [t.name for t in tasks] == [
        f"{f.removeprefix('evals.')}-{EVAL_SEED_BASE + i}" for i, f in enumerate(EVAL_FAMILIES)
    ]
    for t in tasks:
        s = spec(t.family.removeprefix("evals."), int(t.name.rsplit("-", 1)[1]))
        assert (t.goal, t.answer, t.tools) == (s.goal, s.answer, s.tools)
    for tr in asyncio.run(run_traces(tasks)):
        results = [m.text for m in tr.messages if m.role == "tool"]
        assert tr.messages[-1].text == f"Answer: {tr.task.answer}"
        if tr.task.family == "evals.lookup":
            assert f",{tr.task.answer}" in results[0]
        elif tr.task.family == "evals.marks":  # the mark finder counted every dot on the image
            assert results[0].startswith(f"{tr.task.answer} region(s) in img_0")
        else:  # the python tool printed exactly the suite's answer
            assert results[-1].strip() == tr.task.answer


async def test_an_image_task_opens_as_the_loop_opens_it_for_a_text_only_endpoint(tmp_path):
    """The marks family's trace starts with exactly the messages the loop sends a `vision: false` executor
    for the same eval task: the image named and sized, no pixels."""
    from advisor.evals.families import generate as write_task

    from advisor import Advisor, load_task
    from advisor.endpoints.base import Endpoint
    from advisor.messages import Attempt, Message, ModelResponse, Usage
    from training.tasks import from_eval_spec
    from training.traces import input_ledger

    class Recorder(Endpoint):
        def __init__(self):
            super().__init__("flash", EndpointConfig(provider="openai", model="m", free=True, vision=False))
            self.seen: list[list[Message]] = []

        async def send(self, request, on_attempt):
            self.seen.append(list(request.messages))
            return ModelResponse(
                Message.assistant("Answer: 0"), Usage(), "m", "stop", 0.0, [Attempt(1, True, 200)]
            )

    folder = write_task("marks", 4, tmp_path / "tasks")
    ep = {"provider": "openai", "model": "m", "free": True, "vision": False}
    (folder / "advisor.yaml").write_text(json.dumps({"endpoints": {"flash": ep, "frontier": ep}}))
    task = load_task(folder / "task.yaml", check_env=False, strategies=("executor",))
    rec = Recorder()
    runner = Advisor(
        runs_dir=tmp_path / "runs", run_id="r", endpoints={"flash": rec, "frontier": rec}, fsync=False
    )
    await runner.run(task, "executor")
    scripted = from_eval_spec("evals.marks", 4)
    (tmp_path / "inputs").mkdir()
    expected = initial_messages(scripted, input_ledger(scripted, tmp_path / "inputs"))
    opening = rec.seen[0][:2]
    assert [(m.role, m.text, m.images) for m in opening] == [(m.role, m.text, []) for m in expected]
    assert "img_0: 1200x800 px (input image.png)" in expected[1].text
