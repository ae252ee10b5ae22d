"""A task's turns train as one sequence with the same loss as its separate samples; recovery traces; digits
and newlines as single tokens."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
import torch.nn.functional as F
from advisor.engine.text.tokenizer import load_tokenizer

from training.checkpoint import load_trainable, trainable
from training.tasks import generate, with_recovery
from training.traces import encode_sample, packed, run_traces, samples
from training.train import logits_of


def test_digits_and_newlines_are_single_tokens(tok_dir):
    tok = load_tokenizer(tok_dir)
    pieces = [tok.decode([i]) for i in tok.encode("Answer: 1475.25\n\n")]
    assert pieces[-9:] == ["1", "4", "7", "5", ".", "2", "5", "\n", "\n"]
    # a prompt ending in "<think>\n" plus a target starting "\n</think>" is the history's "<think>\n\n</think>"
    assert tok.encode("<think>\n") + tok.encode("\n</think>\nx") == tok.encode("<think>\n\n</think>\nx")


def test_packed_sequence_has_the_separate_samples_loss(traces, tok_dir, init_dir):
    tok = load_tokenizer(tok_dir)
    tr = next(t for t in traces if t.task.family == "order")  # three turns
    ss = samples(tr, tok)
    (seq,) = packed(tok, ss)  # all three line up: one sequence
    ids, labels = seq
    separate = [encode_sample(tok, s) for s in ss]
    assert sum(y != -100 for y in labels) == sum(sum(y != -100 for y in lab) for _, lab in separate)
    model = load_trainable(init_dir)
    with torch.no_grad(), trainable(model):
        big = logits_of(model, torch.tensor([ids]))[0]
        for s_ids, s_labels in separate:
            assert ids[: len(s_ids)] == s_ids
            small = logits_of(model, torch.tensor([s_ids]))[0]
            keep = [j for j in range(len(s_ids) - 1) if s_labels[j + 1] != -100]
            assert all(labels[j + 1] == s_labels[j + 1] for j in keep)
            want = F.cross_entropy(small[keep], torch.tensor([s_labels[j + 1] for j in keep]))
            got = F.cross_entropy(big[keep], torch.tensor([labels[j + 1] for j in keep]))
            assert torch.allclose(got, want, atol=1e-5)


def test_samples_that_do_not_line_up_stay_separate(tok_dir):
    tok = load_tokenizer(tok_dir)
    task = with_recovery(next(generate(1, 3, ("lookup",))), random.Random(0), takeover=True)
    (tr,) = asyncio.run(run_traces([task]))
    ss = samples(tr, tok)
    # after a user message the template drops the earlier turns' empty think blocks: no prefix, two sequences
    assert len(packed(tok, ss)) == 2
    assert [encode_sample(tok, s) for s in ss] == packed(tok, ss)


@pytest.mark.parametrize("takeover", [False, True])
def test_recovery_trace(tok_dir, takeover):
    tok = load_tokenizer(tok_dir)
    base = next(generate(1, 4, ("arith",)))
    task = with_recovery(base, random.Random(1), takeover=takeover)
    (tr,) = asyncio.run(run_traces([task]))
    roles = [m.role for m in tr.messages]
    n_after = 2 if takeover else 1
    assert roles[-2 - n_after :] == ["assistant", *["user"] * n_after, "assistant"]
    wrong = tr.messages[-2 - n_after].text.removeprefix("Answer: ")
    assert wrong != task.answer and len(wrong) == len(task.answer)
    assert f'The answer "{wrong}" was checked and is not correct.' in tr.messages[-1 - n_after].text
    if takeover:
        assert tr.messages[-2].text.startswith("A senior model takes over for the next 1 step(s) (failures)")
    ss = samples(tr, tok)
    assert len(ss) == 2  # the wrong answer is history, never a target
    assert ss[-1].target.endswith(f"Answer: {task.answer}<|im_end|>")
    assert f"Answer: {wrong}<|im_end|>" in ss[-1].prompt


def test_recovery_every_leaves_other_tasks_alone():
    plain = list(generate(8, 2))
    mixed = list(generate(8, 2, recovery_every=4))
    assert [t.name for t in mixed] == [
        t.name + ("-recovery" if i % 4 == 3 else "") for i, t in enumerate(plain)
    ]
    assert [t.answer for t in mixed] == [t.answer for t in plain]


def test_a_redo_recovery_runs_the_calls_again_after_a_miscopied_program(tok_dir):
    tok = load_tokenizer(tok_dir)
    base = next(generate(1, 4, ("arith",)))
    task = with_recovery(base, random.Random(1), takeover=True, redo=True)
    assert task.name.endswith("-redo")
    (tr,) = asyncio.run(run_traces([task]))
    calls = [m.tool_calls[0].arguments["code"] for m in tr.messages if m.role == "assistant" and m.tool_calls]
    right = base.turns[0].calls[0].arguments["code"]
    assert calls[1] == right and len(calls[0]) == len(right)
    assert sum(a != b for a, b in zip(calls[0], right, strict=True)) == 1  # one digit miscopied
    printed = [m.text.strip() for m in tr.messages if m.role == "tool"]
    assert printed[0] != printed[1] == task.answer
    answers = [m.text for m in tr.messages if m.role == "assistant" and m.text]
    # the wrong answer is what the miscopied program printed, and the check's rejection quotes it
    assert answers == [f"Answer: {printed[0]}", f"Answer: {task.answer}"]
    assert any(f'The answer "{printed[0]}" was checked' in m.text for m in tr.messages if m.role == "user")
    ss = samples(tr, tok)
    assert len(ss) == 2  # the redone call and the right answer; the whole attempt is history
    assert right in ss[0].target and calls[0] in ss[0].prompt and "takes over" in ss[0].prompt
    assert ss[1].target.endswith(f"Answer: {task.answer}<|im_end|>")


def test_redo_every_turns_some_recoveries_into_redos():
    plain = list(generate(16, 2, recovery_every=2))
    mixed = list(generate(16, 2, recovery_every=2, redo_every=1))
    assert [t.answer for t in mixed] == [t.answer for t in plain]
    kinds = [t.name.rsplit("-", 1)[-1] for t in mixed]
    assert kinds[1::2].count("redo") >= 2 and "redo" not in kinds[0::2]
    assert [t.name for t in mixed if not t.name.endswith("-redo")] == [
        t.name for t in plain if t.name.replace("-recovery", "") + "-redo" not in {m.name for m in mixed}
    ]
