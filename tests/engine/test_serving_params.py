"""`advisor serve`'s sampling and output parameters with the official `openai` SDK against the real
server on 127.0.0.1 (a tiny random Step checkpoint): stop strings, n choices over one prompt computation,
logprobs, seed, penalties and logit_bias, max_completion_tokens, and a 400 for what it does not honour."""

from __future__ import annotations

import math

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from advisor.engine.serving.server import load_served, running  # noqa: E402

from tests.engine.serve_helpers import ADD, MESSAGES, Scripted, endless, idle, tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("serve_params_ckpt"))
    served = load_served(str(ckpt), kv_blocks=256, max_model_len=1500, name="tiny")
    with running(served) as base:
        yield served, base


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0)


def chat_text(stream) -> tuple[dict[int, str], dict[int, str], dict[int, str | None], list]:
    """Content, reasoning and finish reason per choice index, and every chunk, from a chat stream."""
    content, reasoning, finish, chunks = {}, {}, {}, []
    for ch in stream:
        chunks.append(ch)
        for c in ch.choices:
            content[c.index] = content.get(c.index, "") + (c.delta.content or "")
            reasoning[c.index] = reasoning.get(c.index, "") + (
                getattr(c.delta, "reasoning_content", None) or ""
            )
            finish[c.index] = c.finish_reason or finish.get(c.index)
    return content, reasoning, finish, chunks


# ------------------------------------------------------------------------------------------ stop
SCRIPT = "sum</think>The answer is 5. STAR then STOP and more text"


def test_stop_strings_cut_chat_text_and_end_the_sequence_in_the_core(client, server):
    served, base = server
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=1000)
    with Scripted(served, SCRIPT, then_eos=False) as fake:  # never ends by itself: only the stop can
        once = client.chat.completions.create(**kw, stop="STOP")
        streamed = chat_text(client.chat.completions.create(**kw, stop=["STOP", "xyz"], stream=True))
        listed = client.chat.completions.create(**kw, stop=["then", "STAR"])
    idle(base)
    c = once.choices[0]
    assert c.message.content == "The answer is 5. STAR then" and c.finish_reason == "stop"  # stripped
    assert c.message.reasoning_content == "sum"
    # completion tokens run up to the one that completed the stop string
    upto = SCRIPT.index("STOP") + len("STOP")
    assert once.usage.completion_tokens == len(served.tokenizer.encode(SCRIPT[:upto]))
    content, reasoning, finish, chunks = streamed
    # the held-back tail that could start "STOP" ("ST" of "STAR") was released once it could not; no
    # chunk ever carried text past the stop
    assert content == {0: "The answer is 5. STAR then"} and reasoning == {0: "sum"} and finish == {0: "stop"}
    assert (
        listed.choices[0].message.content == "The answer is 5." and listed.choices[0].finish_reason == "stop"
    )
    seqs = list(fake.seqs.values())
    assert len(seqs) == 3 and all(s.finish_reason == "stop" and len(s.output) < 100 for s in seqs)


def test_stop_strings_on_completions_streamed_and_not(client, server):
    served, base = server
    kw = dict(model="tiny", prompt="Once upon", max_tokens=1000, stop=["STOP"])
    with Scripted(served, SCRIPT, then_eos=False):
        once = client.completions.create(**kw)
        pieces = [c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices]
    idle(base)
    want = SCRIPT[: SCRIPT.index("STOP")]
    assert once.choices[0].text == want and once.choices[0].finish_reason == "stop"
    assert "".join(pieces) == want and not any("STO" in p for p in pieces)


def test_stop_is_checked(client):
    with pytest.raises(openai.BadRequestError, match="at most 4") as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, stop=["a", "b", "c", "d", "e"])
    assert e.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError, match="'stop'"):
        client.completions.create(model="tiny", prompt="x", stop=[""])


def test_a_one_sided_bound_is_said_as_one(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    assert e.value.body["message"] == "'max_tokens' must be at least 1, got 0"


# ------------------------------------------------------------------------------------------ n
LONG = [{"role": "user", "content": "Choices over one prompt: " + "tell me a story about numbers " * 4}]


def test_n_choices_compute_the_prompt_once_and_sum_their_completion_tokens(client, server):
    served, base = server
    stats = served.llm.core.stats
    before = (stats.prompt_tokens, stats.cached_prompt_tokens)
    kw = dict(model="tiny", messages=LONG, max_tokens=6, temperature=1.0, seed=11, logprobs=True)
    once = client.chat.completions.create(**kw, n=3)
    assert [c.index for c in once.choices] == [0, 1, 2]
    prompt = once.usage.prompt_tokens
    cached_each = (prompt - 1) // 16 * 16
    assert cached_each >= 32
    # the first choice computed the prompt (a new one: nothing cached); the two others read it
    assert once.usage.prompt_tokens_details.cached_tokens == 0
    assert stats.prompt_tokens - before[0] == 3 * prompt
    assert stats.cached_prompt_tokens - before[1] == 2 * cached_each
    tokens = [[e.token for e in c.logprobs.content] for c in once.choices]
    assert len({tuple(t) for t in tokens}) > 1  # choice i samples with seed + i
    assert once.usage.completion_tokens == sum(len(t) for t in tokens)
    # streamed: the same seeds give the same choices, each with its own finish reason
    streamed: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    chunks = list(
        client.chat.completions.create(**kw, n=3, stream=True, stream_options={"include_usage": True})
    )
    for ch in chunks:
        for c in ch.choices:
            streamed.setdefault(c.index, []).extend(
                e.token for e in (c.logprobs.content if c.logprobs else [])
            )
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert [streamed[i] for i in range(3)] == tokens
    assert all(finish[i] == once.choices[i].finish_reason for i in range(3))
    assert chunks[-1].usage.completion_tokens == once.usage.completion_tokens
    idle(base)


def test_n_choices_after_a_failed_first_choice_start_nothing(client, server):
    served, base = server
    with endless(served) as fake:
        scripted = served.llm.core.runner.run

        def fail_once(chunks):
            served.llm.core.runner.run = scripted
            raise RuntimeError("the step failed")

        served.llm.core.runner.run = fail_once
        with pytest.raises(openai.BadRequestError, match="the step failed"):
            client.completions.create(model="tiny", prompt="fails first", max_tokens=1400, n=3)
        idle(base)  # the other two were never submitted: nothing is left running
    assert fake.seqs == {}


def test_n_choices_on_completions(client, server):
    kw = dict(model="tiny", prompt="Two choices please", max_tokens=5, temperature=1.0, seed=3, n=2)
    once = client.completions.create(**kw)
    assert [c.index for c in once.choices] == [0, 1]
    streamed: dict[int, str] = {}
    for ch in client.completions.create(**kw, stream=True):
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in once.choices}
    idle(server[1])


# ------------------------------------------------------------------------------------------ logprobs
def engine_run(served, prompt_ids: list[int], **params) -> list[int]:
    """The tokens the engine generates for these settings, run on the core directly (same seeds)."""
    from advisor.engine.serving import SamplingParams

    (seq,) = served.llm.core.generate([prompt_ids], [SamplingParams(stop_token_ids=served.stops, **params)])
    return seq.output


def reference_logprobs(served, prompt_ids: list[int], output: list[int]) -> torch.Tensor:
    """log_softmax of the model's raw logits at each output position (a plain forward, apart from the core)."""
    logits = served.llm.logits(prompt_ids + output)
    return torch.log_softmax(logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(output)], -1)


def chat_ids(served, messages) -> list[int]:
    text = served.tokenizer.apply_chat_template(messages, None, effort=None, tokenize=False)
    return served.tokenizer.encode(text)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chat_logprobs_are_the_raw_logits_log_softmax_streamed_and_not(client, server, temperature):
    served = server[0]
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=6, temperature=temperature, seed=5)
    once = client.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    entries = once.choices[0].logprobs.content
    prompt = chat_ids(served, MESSAGES)
    ids = engine_run(served, prompt, max_tokens=6, temperature=temperature, seed=5)
    assert len(entries) == len(ids) == once.usage.completion_tokens
    ref = reference_logprobs(served, prompt, ids)
    decode = served.tokenizer.decode
    for row, token, e in zip(ref, ids, entries, strict=True):
        assert e.token == decode([token]) and math.isclose(e.logprob, float(row[token]), abs_tol=1e-3)
        top = row.topk(3)
        assert [t.token for t in e.top_logprobs] == [decode([t]) for t in top.indices.tolist()]
        assert all(
            math.isclose(t.logprob, float(v), abs_tol=1e-3)
            for t, v in zip(e.top_logprobs, top.values, strict=True)
        )
    # each token's bytes, even a piece of a character, join up to the text
    text = b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace")
    assert text == decode(ids)
    if temperature == 0:
        assert all(e.logprob == e.top_logprobs[0].logprob for e in entries)
    streamed = []
    for ch in client.chat.completions.create(**kw, logprobs=True, top_logprobs=3, stream=True):
        if ch.choices and ch.choices[0].logprobs:
            streamed += ch.choices[0].logprobs.content
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in entries
    ]
    plain = client.chat.completions.create(**kw)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(client, server):
    served = server[0]
    prompt = served.tokenizer.encode("Once upon a time")
    kw = dict(model="tiny", prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    once = client.completions.create(**kw)
    lp = once.choices[0].logprobs
    ids = engine_run(served, prompt, max_tokens=5)
    ref = reference_logprobs(served, prompt, ids)
    decode = served.tokenizer.decode
    assert lp.tokens == [decode([t]) for t in ids] and len(ids) == once.usage.completion_tokens
    assert all(
        math.isclose(v, float(row[t]), abs_tol=1e-3)
        for v, row, t in zip(lp.token_logprobs, ref, ids, strict=True)
    )
    for top, row in zip(lp.top_logprobs, ref, strict=True):  # the 2 most likely (here the sampled is one)
        assert sorted(top.values(), reverse=True) == pytest.approx(row.topk(2).values.tolist(), abs=1e-3)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    streamed = []
    for ch in client.completions.create(**kw, stream=True):
        if ch.choices and ch.choices[0].logprobs:
            streamed += ch.choices[0].logprobs.tokens
    assert streamed == lp.tokens


def test_logprobs_are_checked(client):
    with pytest.raises(openai.BadRequestError, match="needs 'logprobs': true") as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError, match="between 0 and 20"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match="between 0 and 20"):
        client.completions.create(model="tiny", prompt="x", logprobs=30)


# ------------------------------------------------------------------------------------------ the rest
def test_seed_reproduces_a_sampled_reply(client):
    kw = dict(model="tiny", prompt="Seeded", max_tokens=8, temperature=1.0)
    a, b = (client.completions.create(**kw, seed=42).choices[0].text for _ in range(2))
    assert a == b


def test_logit_bias_and_penalties_pick_what_the_formula_picks(client, server):
    served = server[0]
    prompt = served.tokenizer.encode("Bias")
    x = served.tokenizer.encode("q")[0]
    kw = dict(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=0)
    only_x = client.completions.create(**kw, logit_bias={str(x): 100})
    assert set(only_x.choices[0].logprobs.tokens) == {"q"}
    # "q" favoured by 5: greedy keeps choosing it, unless each earlier use costs 1.5 (frequency) and
    # any use 1.0 (presence); the server picks what that formula picks, on the raw logits
    bias = torch.zeros(served.llm.config.text.vocab_size)
    bias[x] = 5.0
    out: list[int] = []
    for _ in range(16):
        logits = served.llm.logits(prompt + out)[-1] + bias
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
        out.append(int((logits - 1.5 * counts - 1.0 * (counts > 0).float()).argmax()))
    kw.update(max_tokens=16, logit_bias={str(x): 5})
    got = (
        client.completions.create(**kw, frequency_penalty=1.5, presence_penalty=1.0)
        .choices[0]
        .logprobs.tokens
    )
    plain = client.completions.create(**kw).choices[0].logprobs.tokens
    assert got == [served.tokenizer.decode([t]) for t in out]
    assert plain.count("q") > got.count("q") > 0
    with pytest.raises(openai.BadRequestError, match="between -2.0 and 2.0") as e:
        client.completions.create(**kw, presence_penalty=3)
    assert e.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.BadRequestError, match="not in") as e:
        client.completions.create(**{**kw, "logit_bias": {"99999": 1}})


def test_max_completion_tokens_user_and_unsupported_parameters(client, server):
    served, base = server
    with Scripted(served, "word", then_eos=False):
        r = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_completion_tokens=3, user="u-1"
        )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    unsupported = [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"extra_body": {"top_k": 5}}, "top_k"),
        ({"store": True}, "store"),
        ({"extra_body": {"guided_json": {}}}, "guided_json"),
    ]
    for kw, param in unsupported:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, **kw)
        assert e.value.body["param"] == param and param in e.value.body["message"], kw
    for kw, param in [({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="x", max_tokens=2, **kw)
        assert e.value.body["param"] == param
    idle(base)


def test_parallel_tool_calls_false_keeps_the_first_call(client, server):
    call = "<tool_call>\n<function=add>\n<parameter=a>\n{}\n</parameter>\n<parameter=b>\n1\n</parameter>\n</function>\n</tool_call>"
    script = "two</think>" + call.format(1) + call.format(2)
    kw = dict(model="tiny", messages=MESSAGES, tools=[ADD], max_tokens=300)
    with Scripted(server[0], script):
        both = client.chat.completions.create(**kw)
        first = client.chat.completions.create(**kw, parallel_tool_calls=False)
        streamed = [
            t for ch in client.chat.completions.create(**kw, parallel_tool_calls=False, stream=True)
            for t in (ch.choices[0].delta.tool_calls or [])
        ]  # fmt: skip
    assert [t.function.arguments for t in both.choices[0].message.tool_calls] == [
        '{"a": 1, "b": 1}',
        '{"a": 2, "b": 1}',
    ]
    assert [t.function.arguments for t in first.choices[0].message.tool_calls] == ['{"a": 1, "b": 1}']
    assert [(t.index, t.function.arguments) for t in streamed] == [(0, '{"a": 1, "b": 1}')]
    assert first.choices[0].finish_reason == "tool_calls"
