"""Held-out turn-level metrics for a trained checkpoint: greedy generation through `engine.LLM` on the
exact prompts the embedded endpoint would send, parsed with the engine's chat parser.

Per assistant turn of held-out traces:
- `well_formed` (all turns): the output parses without errors and ends its turn (`<|im_end|>`);
- `right_tools` (turns whose script calls tools): the same tool names, in order;
- `right_calls` (those turns): names and arguments equal;
- `right_answer` (final turns, whose script answers): no tool call, and the `Answer:` line equals the answer.

    python -m training.evaluate models/step-nano --n 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from advisor.engine import LLM
from advisor.engine.text.chat import parse_output

from training.tasks import FAMILIES, generate
from training.traces import run_traces, samples


def _answer(text: str) -> str | None:
    for line in reversed(text.strip().splitlines()):
        if line.strip().lower().startswith("answer:"):
            return line.split(":", 1)[1].strip()
    return None


def evaluate(
    ckpt: Path,
    n: int = 60,
    seed: int = 100_003,
    families: tuple[str, ...] = FAMILIES,
    effort: str = "low",
    max_new_tokens: int = 160,
) -> dict:
    llm = LLM.from_pretrained(ckpt, dtype="float32")  # a bf16-stored checkpoint is run in fp32, as shipped
    tok = llm.tokenizer
    traces = asyncio.run(run_traces(list(generate(n, seed, families)), effort))
    rows = []
    for tr in traces:
        for s in samples(tr, tok):
            rows.append((tr, s))
    prompts = [tok.encode(s.prompt) for _, s in rows]
    stops = llm.eos_token_ids
    outs = llm.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stops)
    counts = dict.fromkeys(
        ("turns", "well_formed", "call_turns", "right_tools", "right_calls", "final_turns", "right_answer"), 0
    )
    counts["turns"] = len(rows)
    for (tr, s), new in zip(rows, outs, strict=True):
        ended = bool(new) and new[-1] in stops
        got = parse_output(tok.decode(new[:-1] if ended else new), tr.schemas, in_reasoning=True)
        want = parse_output(s.target.removesuffix("<|im_end|>"), tr.schemas, in_reasoning=True)
        counts["well_formed"] += int(got.ok and ended)
        if want.tool_calls:
            counts["call_turns"] += 1
            counts["right_tools"] += int(
                [c.name for c in got.tool_calls] == [c.name for c in want.tool_calls]
            )
            counts["right_calls"] += int(
                [(c.name, c.arguments) for c in got.tool_calls]
                == [(c.name, c.arguments) for c in want.tool_calls]
            )
        else:
            counts["final_turns"] += 1
            counts["right_answer"] += int(not got.tool_calls and _answer(got.content) == tr.task.answer)
    out = dict(counts)
    out["well_formed_rate"] = round(counts["well_formed"] / max(1, counts["turns"]), 3)
    for k in ("right_tools", "right_calls"):
        out[k + "_rate"] = round(counts[k] / max(1, counts["call_turns"]), 3)
    out["right_answer_rate"] = round(counts["right_answer"] / max(1, counts["final_turns"]), 3)
    out["held_out_tasks"] = n
    out["seed"] = seed
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate")
    p.add_argument("checkpoint")
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--seed", type=int, default=100_003)
    p.add_argument("--families", default=",".join(FAMILIES))
    a = p.parse_args(argv)
    print(json.dumps(evaluate(Path(a.checkpoint), a.n, a.seed, tuple(a.families.split(","))), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
