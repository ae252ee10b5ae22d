"""Copy drills: short synthetic sequences that teach a fresh model to copy from its context.

Why they exist: trained on the agent traces alone (sequences of ~950 tokens, most of them the system prompt),
neither preset learned to copy a number: not from the goal into code, not from a tool result into the
answer. A probe on step-nano's architecture shows why. Copying digits past 400 filler tokens stayed at chance
after 600 steps. Copying past 0 or 40 filler tokens was learnt in 300 to 400 steps. With the filler growing
from 20 tokens, the model then copied past 400. The copy mechanism (induction heads) forms on short contexts
and then carries over to long ones. So training starts with drills whose context grows, and keeps some
drills mixed in afterwards.

Each drill is a random slice of a real training sequence (the filler: the context the model must look
past), then one of the copy patterns the agent traces need, written with the real chat markers:
- `span`: an expression in a user message, copied as the reply (goal -> code);
- `result`: a number in a tool response, copied into the final turn exactly as the traces answer;
- `recall`: a `key,value` table in a tool response and a key in a user message; the reply is the key's value
  (a lookup, and an order's quantities and prices).
Only the reply is trained on.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from training.tasks import ITEMS, OPS

KINDS = ("span", "result", "recall")
_ASK = ("Evaluate", "Compute", "Work out", "Use", "Copy", "Take")


def _number(rng: random.Random) -> str:
    whole = str(rng.randint(0, 10 ** rng.randint(1, 5) - 1))
    if rng.random() < 0.3:
        whole += f".{rng.randint(0, 99):02d}"
    return ("-" if rng.random() < 0.1 else "") + whole


def _expression(rng: random.Random) -> str:
    parts = [_number(rng).lstrip("-")]
    for _ in range(rng.randint(0, 3)):
        parts += [rng.choice(OPS), _number(rng).lstrip("-")]
    return " ".join(parts)


def _pattern(rng: random.Random, kind: str) -> tuple[str, str]:
    """(context, reply) of one drill, in the chat format the traces use."""
    think = "<|im_start|>assistant\n<think>\n"
    if kind == "span":
        expr = _expression(rng)
        ctx = f"<|im_start|>user\n{rng.choice(_ASK)} {expr} now.<|im_end|>\n{think}\n</think>\n"
        return ctx, f"{expr}<|im_end|>"
    if kind == "result":
        n = _number(rng)
        ctx = f"<|im_start|>tool_response\n<tool_response>{n}\n</tool_response><|im_end|>\n{think}"
        return ctx, f"The program printed {n}.\n</think>\nAnswer: {n}<|im_end|>"
    # the item names the lookup and order tasks use
    values = {k: _number(rng).lstrip("-") for k in rng.sample(ITEMS, rng.randint(3, 9))}
    table = "".join(f"{k},{v}\n" for k, v in values.items())
    key = rng.choice(list(values))
    value = values[key]
    ctx = (
        f"<|im_start|>tool_response\n<tool_response>item,value\n{table}</tool_response><|im_end|>\n"
        f"<|im_start|>user\nThe value for {key}?<|im_end|>\n{think}\n</think>\n"
    )
    return ctx, f"{value}<|im_end|>"


def drill(
    rng: random.Random, tokenizer: Any, fillers: Sequence[Sequence[int]], filler_len: int, kind: str
) -> tuple[list[int], list[int]]:
    """(ids, labels) of one drill: `filler_len` tokens sliced from a random filler, then a copy pattern."""
    filler: list[int] = []
    if filler_len > 0 and fillers:
        src = fillers[rng.randrange(len(fillers))]
        start = rng.randint(0, max(0, len(src) - filler_len))
        filler = list(src[start : start + filler_len])
    ctx, reply = _pattern(rng, kind)
    c = tokenizer.encode(ctx)
    r = tokenizer.encode(reply)
    ids = filler + c + r
    return ids, [-100] * (len(filler) + len(c)) + r


def drill_batch(
    rng: random.Random,
    tokenizer: Any,
    fillers: Sequence[Sequence[int]],
    max_filler: int,
    tokens: int,
    kinds: Sequence[str] = KINDS,
) -> list[tuple[list[int], list[int]]]:
    """Drills sharing one filler length drawn from [0, max_filler] (little padding), about `tokens` in all:
    short drills come many to a batch, long ones few, so a drill step costs about what a trace step does."""
    n = rng.randint(0, max(0, max_filler))
    size = max(4, min(32, tokens // (n + 64)))
    return [drill(rng, tokenizer, fillers, n, rng.choice(kinds)) for _ in range(size)]


def filler_cap(step: int, warmup: int, start: int, end: int) -> int:
    """The longest filler at `step`: `start` for the first half of the warm-up (the copy forms on short
    contexts first), then growing linearly to `end` by its end, then staying there."""
    if warmup <= 0 or step >= warmup:
        return end
    hold = warmup // 2
    if step < hold:
        return start
    return int(start + (end - start) * (step - hold) / (warmup - hold))


def kinds_at(step: int, warmup: int) -> tuple[str, ...]:
    """The drill kinds in play at `step`: `result` alone for the first third of the warm-up, then `span`
    too, then all. Mixed from the start, every kind was learnt several times more slowly."""
    if warmup > 0 and step < warmup // 3:
        return ("result",)
    if warmup > 0 and step < 2 * warmup // 3:
        return ("result", "span")
    return KINDS
