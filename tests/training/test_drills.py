"""Copy drills: the reply is a copy of what the context holds, only the reply is trained, the filler is a
real slice, and the schedule puts drills first and then between trace batches."""

from __future__ import annotations

import random

import pytest
from advisor.engine.text.tokenizer import load_tokenizer

from training.drills import KINDS, drill, drill_batch, filler_cap, kinds_at
from training.traces import encode_sample
from training.train import TrainConfig, is_drill_step, total_steps


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def fillers(tok, all_samples):
    return [encode_sample(tok, s)[0] for s in all_samples]


@pytest.mark.parametrize("kind", KINDS)
def test_the_reply_is_copied_from_the_context_and_is_the_only_target(tok, fillers, kind):
    rng = random.Random(3)
    for _ in range(20):
        ids, labels = drill(rng, tok, fillers, 50, kind)
        assert len(ids) == len(labels)
        cut = next(i for i, y in enumerate(labels) if y != -100)
        assert all(y != -100 for y in labels[cut:]) and labels[cut:] == ids[cut:]
        assert any(ids[:50] == f[j : j + 50] for f in fillers for j in range(len(f) - 49))
        context, reply = tok.decode(ids[50:cut]), tok.decode(ids[cut:])
        assert reply.endswith("<|im_end|>")
        copied = reply.removesuffix("<|im_end|>")
        if kind == "result":  # "The program printed N.\n</think>\nAnswer: N"
            number = copied.rsplit("Answer: ", 1)[1]
            assert f"<tool_response>{number}\n</tool_response>" in context
            assert copied == f"The program printed {number}.\n</think>\nAnswer: {number}"
        elif kind == "span":
            assert f" {copied} now." in context
        else:
            key = context.rsplit("The value for ", 1)[1].split("?", 1)[0]
            assert f"\n{key},{copied}\n" in context


def test_a_batch_shares_one_filler_length_and_keeps_to_its_token_budget(tok):
    pad = tok.pad_token_id
    fillers = [[pad] * 3000]  # a filler of pads: its length is the run of pads a drill starts with
    rng = random.Random(0)
    for cap in (0, 16, 300, 1000):
        for _ in range(5):
            group = drill_batch(rng, tok, fillers, cap, 4096)
            lens = {next(i for i, t in enumerate(ids + [-1]) if t != pad) for ids, _ in group}
            assert len(lens) == 1 and 0 <= lens.pop() <= cap
            assert 4 <= len(group) <= 32
            assert len(group) == 4 or sum(len(i) for i, _ in group) < 2 * 4096


def test_the_filler_grows_over_the_warm_up_then_stays():
    caps = [filler_cap(s, 100, 16, 1024) for s in range(150)]
    assert caps[:50] == [16] * 50 and caps[75] == 520 and caps[100:] == [1024] * 50
    assert all(a <= b for a, b in zip(caps, caps[1:], strict=False))
    assert filler_cap(0, 0, 16, 1024) == 1024


def test_the_kinds_come_in_one_at_a_time():
    assert [kinds_at(s, 90) for s in (0, 29, 30, 59, 60, 89, 90)] == [
        ("result",),
        ("result",),
        ("result", "span"),
        ("result", "span"),
        KINDS,
        KINDS,
        KINDS,
    ]
    assert kinds_at(0, 0) == KINDS


def test_the_schedule_drills_first_then_after_every_nth_trace_batch():
    cfg = TrainConfig(drill_warmup=3, drill_every=4)
    total = total_steps(20, cfg)
    kinds = ["d" if is_drill_step(s, cfg) else "t" for s in range(total)]
    assert "".join(kinds) == "ddd" + "ttttd" * 5
    assert kinds.count("t") == 20
    off = TrainConfig(drill_warmup=0, drill_every=0)
    assert total_steps(20, off) == 20 and not any(is_drill_step(s, off) for s in range(20))
