"""Parsing Step model output: reasoning / content / tool calls, whole and streamed, and malformed markup."""

from __future__ import annotations

import json

import pytest
from advisor.engine.text.chat import ParsedOutput, StreamingParser, parse_output

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "python",
            "parameters": {
                "type": "object",
                "properties": {
                    "code": {"type": "string"},
                    "timeout": {"type": "integer"},
                    "strict": {"type": "boolean"},
                    "files": {"type": "array"},
                    "opts": {"type": "object"},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "read_file", "parameters": {"properties": {"path": {"type": "string"}}}},
    },
]

OUTPUT = (
    "The user wants a sum.\nI'll run code: <b>not a tag</b> x < y.\n</think>\n\n"
    "Running it now.\n"
    "<tool_call>\n<function=python>\n<parameter=code>\nprint(1 + 2)\nif a<b: pass\n</parameter>\n"
    "<parameter=timeout>\n30\n</parameter>\n<parameter=strict>\nFalse\n</parameter>\n"
    '<parameter=files>\n["a.txt", "b.txt"]\n</parameter>\n<parameter=opts>\n{"x": null}\n</parameter>\n'
    "</function>\n</tool_call>\n"
    "<tool_call>\n<function=read_file>\n<parameter=path>\n123\n</parameter>\n</function>\n</tool_call>"
    "<|im_end|>ignored after the end"
)

EXPECTED_CALLS = [
    (
        "python",
        {
            "code": "print(1 + 2)\nif a<b: pass",
            "timeout": 30,
            "strict": False,
            "files": ["a.txt", "b.txt"],
            "opts": {"x": None},
        },
    ),
    ("read_file", {"path": "123"}),  # the schema says string: no JSON decoding
]


def _calls(parsed: ParsedOutput):
    return [(c.name, c.arguments) for c in parsed.tool_calls]


def test_whole_output():
    parsed = parse_output(OUTPUT, TOOLS)
    assert parsed.ok and parsed.ended
    assert parsed.reasoning == "The user wants a sum.\nI'll run code: <b>not a tag</b> x < y."
    assert parsed.content == "Running it now."
    assert _calls(parsed) == EXPECTED_CALLS
    first = parsed.tool_calls[0].to_openai()
    assert first["type"] == "function" and first["id"].startswith("call_")
    assert json.loads(first["function"]["arguments"]) == EXPECTED_CALLS[0][1]
    assert parsed.tool_calls[0].id != parsed.tool_calls[1].id


def _stream(text: str, cuts: list[int], tools=TOOLS) -> tuple[ParsedOutput, str, str, int]:
    parser = StreamingParser(tools)
    reasoning = content = ""
    calls = 0
    bounds = [0, *cuts, len(text)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        d = parser.feed(text[a:b])
        reasoning += d.reasoning
        content += d.content
        calls += len(d.tool_calls)
    d = parser.finish()
    reasoning += d.reasoning
    content += d.content
    calls += len(d.tool_calls)
    return parser.result, reasoning, content, calls


def _same(a: ParsedOutput, b: ParsedOutput) -> bool:
    return (a.reasoning, a.content, _calls(a), [e.message for e in a.errors], a.ended) == (
        b.reasoning,
        b.content,
        _calls(b),
        [e.message for e in b.errors],
        b.ended,
    )


def test_split_at_every_position_gives_the_same_result():
    whole = parse_output(OUTPUT, TOOLS)
    for cut in range(len(OUTPUT) + 1):
        result, reasoning, content, calls = _stream(OUTPUT, [cut])
        assert _same(result, whole), (
            f"split at {cut}: {OUTPUT[max(0, cut - 10) : cut]!r}|{OUTPUT[cut : cut + 10]!r}"
        )
        # The deltas add up to the result: nothing emitted twice, nothing retracted.
        assert (reasoning, content, calls) == (whole.reasoning, whole.content, len(whole.tool_calls))


def test_character_by_character_and_two_cuts_through_a_tool_call():
    whole = parse_output(OUTPUT, TOOLS)
    assert _same(_stream(OUTPUT, list(range(1, len(OUTPUT))))[0], whole)
    start = OUTPUT.index("<tool_call>")
    end = OUTPUT.index("</tool_call>") + len("</tool_call>")
    for a in range(start - 2, end + 2, 3):
        for b in range(a + 1, end + 3, 7):
            assert _same(_stream(OUTPUT, [a, b])[0], whole), (a, b)


def test_tool_call_is_reported_only_once_it_is_complete():
    parser = StreamingParser(TOOLS)
    head = OUTPUT[: OUTPUT.index("</tool_call>")]
    assert not any(parser.feed(ch).tool_calls for ch in head)
    delta = parser.feed("</tool_call>")
    assert [c.name for c in delta.tool_calls] == ["python"]


def test_content_is_streamed_before_the_turn_ends():
    parser = StreamingParser()
    assert parser.feed("Thinking hard").reasoning == "Thinking hard"
    d = parser.feed("</think>\nThe answer is 4")
    assert d.content == "The answer is 4"
    d = parser.feed("2.<|im_")
    assert d.content == "2."  # "<|im_" is held back: it may be the end of turn
    d = parser.feed("end|>")
    assert not d and parser.result.ended and parser.result.content == "The answer is 42."


def test_output_that_opens_with_think_and_prompt_outside_reasoning():
    assert parse_output("<think>\nhmm\n</think>\nhi").reasoning == "hmm"
    plain = parse_output("just an answer", in_reasoning=False)
    assert (plain.reasoning, plain.content) == ("", "just an answer")
    thought = parse_output("<think>a</think>b", in_reasoning=False)
    assert (thought.reasoning, thought.content) == ("a", "b")


def test_truncated_reasoning_is_all_reasoning():
    parsed = parse_output("still thinking about <tool", TOOLS)
    assert parsed.ok and not parsed.ended
    assert parsed.reasoning == "still thinking about <tool" and parsed.content == ""


def test_tool_call_straight_out_of_reasoning():
    text = "plan\n<tool_call>\n<function=read_file>\n<parameter=path>\n/a\n</parameter>\n</function>\n</tool_call>"
    parsed = parse_output(text, TOOLS)
    assert parsed.ok and parsed.reasoning == "plan" and _calls(parsed) == [("read_file", {"path": "/a"})]


def test_values_without_schema_decode_as_json_when_they_can():
    text = (
        "</think><tool_call>\n<function=anything>\n<parameter=n>\n7\n</parameter>\n<parameter=s>\nhello\n"
        "</parameter>\n<parameter=b>\ntrue\n</parameter>\n<parameter=l>\n[1, 2]\n</parameter>\n</function>\n</tool_call>"
    )
    assert _calls(parse_output(text)) == [("anything", {"n": 7, "s": "hello", "b": True, "l": [1, 2]})]


def test_schema_typed_values_fall_back_to_text():
    text = "</think><tool_call>\n<function=python>\n<parameter=timeout>\nsoon\n</parameter>\n</function>\n</tool_call>"
    assert _calls(parse_output(text, TOOLS)) == [("python", {"timeout": "soon"})]


MALFORMED = {
    "unclosed tool_call": (
        "</think>x<tool_call>\n<function=python>\n<parameter=code>\n1\n</parameter>\n",
        "unclosed <tool_call>",
    ),
    "unclosed before end": (
        "</think><tool_call>\n<function=python>\n</function>\n<|im_end|>",
        "unclosed <tool_call>",
    ),
    "missing function": ('</think><tool_call>\n{"name": "python"}\n</tool_call>', "without <function=NAME>"),
    "empty name": ("</think><tool_call>\n<function=>\n</function>\n</tool_call>", "empty function name"),
    "bad name": (
        "</think><tool_call>\n<function=rm -rf>\n</function>\n</tool_call>",
        "invalid function name",
    ),
    "unknown function": (
        "</think><tool_call>\n<function=shell>\n</function>\n</tool_call>",
        "unknown function 'shell'",
    ),
    "unclosed function": (
        "</think><tool_call>\n<function=python>\n<parameter=code>\n1\n</parameter>\n</tool_call>",
        "not closed by </function>",
    ),
    "unclosed parameter": (
        "</think><tool_call>\n<function=python>\n<parameter=code>\n1\n</function>\n</tool_call>",
        "unclosed <parameter",
    ),
    "garbage": (
        "</think><tool_call>\n<function=python>\nrun it!\n</function>\n</tool_call>",
        "unexpected text 'run it!'",
    ),
    "duplicate": (
        "</think><tool_call>\n<function=read_file>\n<parameter=path>\na\n</parameter>\n<parameter=path>\nb\n"
        "</parameter>\n</function>\n</tool_call>",
        "given twice",
    ),
    "no wrapper": (
        "</think>ok\n<function=python>\n<parameter=code>\n1\n</parameter>\n</function>\n</tool_call>",
        "without a <tool_call> wrapper",
    ),
    "bare and unclosed": (
        "</think><function=python>\n<parameter=code>\n1\n</parameter>\n",
        "unclosed <function=...>",
    ),
    "new call inside call": (
        "</think><tool_call>\n<function=python>\n<tool_call>\n<function=read_file>\n"
        "<parameter=path>\na\n</parameter>\n</function>\n</tool_call>",
        "unclosed <tool_call>",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_markup_is_a_parse_error(case):
    text, message = MALFORMED[case]
    parsed = parse_output(text, TOOLS)
    assert not parsed.ok
    assert message in parsed.errors[0].message
    assert "\n" not in parsed.errors[0].message
    assert parsed.errors[0].raw.startswith(
        ("<tool_call>", "<function=")
    )  # the offending markup, for the trace
    # Streaming reaches the same verdict wherever the text is cut.
    for cut in range(0, len(text) + 1, 3):
        assert _same(_stream(text, [cut])[0], parsed), (case, cut)


def test_well_formed_call_after_a_broken_one_still_counts():
    text = MALFORMED["new call inside call"][0]
    parsed = parse_output(text, TOOLS)
    assert len(parsed.errors) == 1 and _calls(parsed) == [("read_file", {"path": "a"})]
