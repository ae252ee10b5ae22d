"""Scripted tasks -> full agent traces (real tools, real workspace) -> training samples in the Step format.

A trace is the neutral `advisor.messages.Message` list the Advisor loop would hold: the loop's own
system and user prompts (advisor/templates/executor_system.jinja, task_user.jinja), assistant turns with
reasoning and tool calls, and the tool messages the real tools return. Images appear as a text-only
endpoint (`vision: false`) gets them: the loop's lines naming them, no pixels.

A sample is one assistant turn as the embedded endpoint sees it: `prompt` is exactly the text
`advisor.endpoints.embedded` renders for the messages before that turn (`to_openai_messages`, the
checkpoint's chat template, the task's effort, generation prompt), so it ends in
`<|im_start|>assistant\\n<think>\\n`; `target` is what the model must write from there: reasoning,
`</think>`, content and XML tool calls, up to and including `<|im_end|>`. Earlier assistant turns appear
in the prompt the way the endpoint sends them back (without reasoning), so train and inference agree
byte for byte; `tests/training/test_data.py` checks that against the endpoint itself.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advisor.tools.images import ImageLedger
from advisor.tools.registry import resolve
from advisor.tools.spec import ToolContext

from advisor.endpoints.openai import to_openai_messages
from advisor.loop import tool_images_note
from advisor.messages import Message, ToolCall
from advisor.prompts import render
from training.tasks import ScriptedTask

END = "<|im_end|>"


@dataclass
class Trace:
    task: ScriptedTask
    messages: list[Message]
    schemas: list[dict[str, Any]]
    effort: str | None


@dataclass
class Sample:
    prompt: str
    target: str


def initial_messages(task: ScriptedTask, images: ImageLedger | None = None) -> list[Message]:
    """The loop's first two messages for this task (as `advisor.loop` `_prepare` renders them), as a
    text-only endpoint (`vision: false`) gets them: the input images named and sized, no pixels. `images`
    holds the task's input images, loaded in order (`input_ledger`)."""
    ids = list(images.ids()) if images is not None else []
    system = render("executor_system", tools=task.tools, has_images=bool(ids))
    user = render(
        "task_user",
        goal=task.goal.strip(),
        images=[images.describe(i) for i in ids],
        files=sorted(task.files),
    )
    return [Message.system(system), Message.user(user)]


def input_ledger(task: ScriptedTask, folder: Path) -> ImageLedger | None:
    """The task's input images written to `folder` and loaded as the loop loads them (None: it has none)."""
    if not task.images:
        return None
    ledger = ImageLedger()
    for name, data in task.images.items():
        (folder / name).write_bytes(data)
        ledger.load(folder / name)
    return ledger


async def run_trace(task: ScriptedTask, effort: str | None = "low") -> Trace:
    """Play the task's script with the real tools in a fresh workspace; the results are what they return."""
    specs = resolve(task.tools)
    by_name = {s.name: s for s in specs}
    with tempfile.TemporaryDirectory(prefix="trace-") as tmp:
        ws, inputs = Path(tmp) / "workspace", Path(tmp) / "inputs"
        ws.mkdir()
        inputs.mkdir()
        for name, body in task.files.items():
            (ws / name).write_text(body, encoding="utf-8")
        ledger = input_ledger(task, inputs)
        messages = initial_messages(task, ledger)
        ctx = ToolContext(workspace=ws, images=ledger)
        n, printed = 0, ""
        for turn in task.turns:
            calls = []
            for c in turn.calls:
                calls.append(
                    ToolCall(
                        id=f"call_{n}",
                        name=c.name,
                        arguments=c.arguments,
                        raw_arguments=json.dumps(c.arguments),
                    )
                )
                n += 1
            content, after = turn.content, turn.after
            if turn.answer_from_tool:
                got = (printed.strip().splitlines() or [""])[-1].strip()
                if got != task.answer:  # and the check's rejection quotes it
                    content = f"Answer: {got}"
                    after = [(t, {**a, "answer": got} if "answer" in a else a) for t, a in after]
            messages.append(Message.assistant(content, calls, reasoning=turn.reasoning))
            produced: list[str] = []
            for call in calls:
                result = await by_name[call.name].invoke(call.arguments, ctx)
                if result.is_error:
                    raise RuntimeError(
                        f"task {task.name}: scripted call {call.name} failed: {result.text[:200]}"
                    )
                messages.append(Message.tool(call.id, call.name, result.text))
                printed = result.text
                produced += [i for i, _ in result.images]
            if produced and ledger is not None:  # as the loop names them (their pixels stay out: text-only)
                messages.append(Message.user(tool_images_note(ledger, produced)))
            for template, args in after:
                messages.append(Message.user(render(template, **args)))
    return Trace(task, messages, [s.openai_schema() for s in specs], effort)


async def run_traces(
    tasks: Iterable[ScriptedTask], effort: str | None = "low", concurrency: int = 4
) -> list[Trace]:
    sem = asyncio.Semaphore(concurrency)

    async def one(t: ScriptedTask) -> Trace:
        async with sem:
            return await run_trace(t, effort)

    return list(await asyncio.gather(*(one(t) for t in tasks)))


def render_prompt(
    tokenizer: Any, messages: Sequence[Message], schemas: list[dict], effort: str | None
) -> str:
    """The text the embedded endpoint renders for these messages (see `EmbeddedEndpoint._complete_sync`)."""
    return tokenizer.apply_chat_template(
        to_openai_messages(list(messages)), schemas or None, effort=effort, tokenize=False
    )


def samples(trace: Trace, tokenizer: Any) -> list[Sample]:
    """One sample per trained assistant turn of the trace (a `train=False` turn is history only)."""
    out = []
    turns = iter(trace.task.turns)
    for i, msg in enumerate(trace.messages):
        if msg.role != "assistant":
            continue
        if not next(turns).train:
            continue
        history = trace.messages[:i]
        prompt = render_prompt(tokenizer, history, trace.schemas, trace.effort)
        wire = to_openai_messages([*history, msg])
        wire[-1]["reasoning_content"] = msg.reasoning or ""
        full = tokenizer.apply_chat_template(
            wire, trace.schemas or None, effort=trace.effort, add_generation_prompt=False, tokenize=False
        )
        if not full.startswith(prompt):
            raise ValueError(
                f"task {trace.task.name}: turn {i} does not extend its prompt in this chat template"
            )
        target = full[len(prompt) :]
        cut = target.find(END)
        if cut < 0:
            raise ValueError(f"task {trace.task.name}: turn {i} renders without {END}")
        out.append(Sample(prompt, target[: cut + len(END)]))
    return out


def encode_sample(tokenizer: Any, sample: Sample) -> tuple[list[int], list[int]]:
    """(ids, labels): labels are -100 on the prompt, the ids themselves on the target.

    The prompt is encoded alone, as the endpoint encodes it; the target is what generation produces.
    """
    p = list(tokenizer.encode(sample.prompt))
    t = list(tokenizer.encode(sample.target))
    return p + t, [-100] * len(p) + t


def packed(tokenizer: Any, items: Sequence[Sample]) -> list[tuple[list[int], list[int]]]:
    """A trace's samples as few sequences as possible, with exactly the labels the separate samples have.

    Each sample's prompt holds the earlier turns the way the endpoint sends them back; where the last
    sample's ids start with an earlier sample's prompt and target ids (a turn without reasoning, whose
    history form is its target), the earlier sample is folded into it: causal attention gives its
    positions the same context and so the same loss. A sample that does not line up stays on its own.
    """
    encoded = [encode_sample(tokenizer, s) for s in items]
    if not encoded:
        return []
    ids, labels = encoded[-1]
    labels = list(labels)
    out = []
    for e_ids, e_labels in encoded[:-1]:
        if ids[: len(e_ids)] == e_ids:
            for j, y in enumerate(e_labels):
                if y != -100:
                    labels[j] = y
        else:
            out.append((e_ids, e_labels))
    out.append((ids, labels))
    return out


def write_jsonl(path: Path, items: Iterable[Sample]) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for s in items:
            f.write(json.dumps({"prompt": s.prompt, "target": s.target}, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[Sample]:
    with path.open(encoding="utf-8") as f:
        return [Sample(**json.loads(line)) for line in f if line.strip()]
