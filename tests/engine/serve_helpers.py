"""What the `advisor serve` tests share: a tiny random Step checkpoint with the project's test tokenizer,
a wait for the engine to go idle, and stand-ins for the model's step (the scheduler, block pool and
server stay real)."""

from __future__ import annotations

import copy
import time

import httpx
from advisor.engine.text.tokenizer import build_step_tokenizer

from tests.engine.step_models import TEXT_C, build_reference

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
MESSAGES = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2 + 3?"}]


def tiny_checkpoint(path):
    tok = build_step_tokenizer(path, vocab_size=400)
    text = copy.deepcopy(TEXT_C)
    text.update(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    build_reference(text, seed=3).save_pretrained(path)
    return path


def idle(base: str) -> dict:
    """/health once the engine has nothing running (a cancelled request lands at the next step); polls
    with a deadline."""
    for _ in range(300):
        h = httpx.get(base + "/health").json()
        if h["running"] == 0 and h["waiting"] == 0 and h["kv_blocks_in_use"] == 0:
            return h
        time.sleep(0.02)
    raise AssertionError(f"the engine did not go idle: {h}")


class Scripted:
    """Stands in for the model's choice of tokens: every sequence generates `text` then end-of-turn, or
    with `then_eos=False` repeats the script's last token until something else ends it; `delay` seconds
    per step. The model still runs each step (so the blocks the prefix cache keeps hold real keys and
    values for later requests); only its tokens are replaced. The sequences seen are kept in `seqs`."""

    def __init__(self, served, text: str, then_eos: bool = True, delay: float = 0.0):
        tok = served.tokenizer
        self.served, self.ids = served, tok.encode(text) + ([tok.eos_token_id] if then_eos else [])
        self.delay, self.real, self.seqs = delay, served.llm.core.runner.run, {}

    def __enter__(self):
        def run(chunks):
            if self.delay:
                time.sleep(self.delay)
            self.seqs.update((c.seq.id, c.seq) for c in chunks)
            self.real(chunks)
            return {
                c.seq.id: [self.ids[min(len(c.seq.output), len(self.ids) - 1)]] for c in chunks if c.samples
            }

        self.served.llm.core.runner.run = run
        return self

    def __exit__(self, *exc):
        self.served.llm.core.runner.run = self.real


def endless(served) -> Scripted:
    """One token repeated, a step every 10 ms: a long max_tokens keeps the sequence running for seconds."""
    return Scripted(served, "word", then_eos=False, delay=0.01)
