"""Step chat rendering: the default template, checkpoint templates, normalisation, images."""

from __future__ import annotations

import json

import pytest
from advisor.engine.text.chat import (
    IMAGE_PLACEHOLDER,
    ChatTemplate,
    ChatTemplateError,
    expand_image_placeholders,
    image_token_layout,
    normalize_messages,
    parse_output,
    render_chat,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "crop",
            "description": "Crop <region> & zoom",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "box": {"type": "array", "items": {"type": "integer"}},
                    "scale": {"type": "number"},
                    "keep": {"type": "boolean"},
                    "note": {"type": ["string", "null"]},
                },
                "required": ["path", "box"],
            },
        },
    },
    {"type": "function", "function": {"name": "done", "parameters": {"type": "object", "properties": {}}}},
]

CALL_ARGS = {"path": "a b.png", "box": [1, 2, 30, 40], "scale": 1.5, "keep": False, "note": "two\nlines"}

CONVERSATION = [
    {"role": "system", "content": "You read receipts."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Total? "}, {"type": "image_url", "image_url": {"url": "x"}}],
    },
    {
        "role": "assistant",
        "content": None,
        "reasoning_content": "Crop the bottom.",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "crop", "arguments": json.dumps(CALL_ARGS)},
            },
            {"id": "c2", "type": "function", "function": {"name": "done", "arguments": {}}},
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "name": "crop", "content": "cropped"},
    {"role": "tool", "tool_call_id": "c2", "name": "done", "content": [{"type": "text", "text": "ok"}]},
]


def test_default_template_renders_the_step_format():
    text = render_chat(CONVERSATION, TOOLS, effort="medium")
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\nYou read receipts.\n\nReasoning: medium\n\n# Tools\n")
    # Each tool one JSON line inside <tools>, with '<' and '&' left as they are.
    tools_block = system.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert [json.loads(line) for line in tools_block.splitlines()] == TOOLS
    assert rest.startswith(f"<|im_start|>user\nTotal? {IMAGE_PLACEHOLDER}<|im_end|>\n")
    assert (
        "<|im_start|>assistant\n<think>\nCrop the bottom.\n</think>\n<tool_call>\n<function=crop>\n"
        "<parameter=path>\na b.png\n</parameter>\n<parameter=box>\n[1, 2, 30, 40]\n</parameter>\n"
        "<parameter=scale>\n1.5\n</parameter>\n<parameter=keep>\nFalse\n</parameter>\n"
        "<parameter=note>\ntwo\nlines\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=done>\n</function>\n</tool_call><|im_end|>\n"
    ) in rest
    # Consecutive tool results share one tool_response turn.
    assert rest.count("<|im_start|>tool_response\n") == 1
    assert "<tool_response>cropped</tool_response><tool_response>ok</tool_response><|im_end|>\n" in rest
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert "tool_call_id" not in text


def test_rendered_tool_calls_parse_back_to_the_same_arguments():
    text = render_chat(CONVERSATION[:3], TOOLS, add_generation_prompt=False)
    completion = text.rsplit("<|im_start|>assistant\n<think>\n", 1)[1]
    parsed = parse_output(completion, TOOLS)
    assert parsed.ok and parsed.ended
    assert parsed.reasoning == "Crop the bottom."
    assert parsed.content == ""
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("crop", CALL_ARGS), ("done", {})]


def test_reasoning_kept_only_after_the_last_user_query():
    msgs = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "A1", "reasoning_content": "old thoughts"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "A2", "reasoning_content": "new thoughts"},
    ]
    text = render_chat(msgs, add_generation_prompt=False)
    assert "old thoughts" not in text
    assert "<|im_start|>assistant\nA1<|im_end|>\n" in text
    assert "<|im_start|>assistant\n<think>\nnew thoughts\n</think>\nA2<|im_end|>\n" in text
    assert not text.startswith("<|im_start|>system")  # no system prompt, no tools, no effort: no system turn


def test_inline_think_in_assistant_content_moves_to_reasoning():
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>\nplan\n</think>\n\nanswer"},
    ]
    assert normalize_messages(msgs)[1]["reasoning_content"] == "plan"
    text = render_chat(msgs, add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\n<think>\nplan\n</think>\nanswer<|im_end|>\n")


def test_effort_alone_makes_a_system_turn_and_bad_effort_is_refused():
    text = render_chat([{"role": "user", "content": "hi"}], effort="high")
    assert text.startswith("<|im_start|>system\nReasoning: high<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")
    with pytest.raises(ChatTemplateError, match="effort 'max'"):
        render_chat([{"role": "user", "content": "hi"}], effort="max")


@pytest.mark.parametrize(
    ("messages", "where"),
    [
        ([{"role": "robot", "content": "x"}], r"messages\[0\]: unknown role 'robot'"),
        (
            [{"role": "user", "content": [{"type": "audio"}]}],
            r"messages\[0\]\.content\[0\]: unsupported part 'audio'",
        ),
        (
            [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}],
                }
            ],
            r"messages\[0\]\.tool_calls\[0\]\.function\.arguments: not valid JSON",
        ),
        ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], "missing function name"),
        ("hello", "expected a list of dicts"),
    ],
)
def test_bad_messages_give_one_line_errors(messages, where):
    with pytest.raises(ChatTemplateError, match=where) as info:
        render_chat(messages)
    assert "\n" not in str(info.value)


def test_checkpoint_template_wins_over_the_default(tmp_path):
    shipped = "{% for m in messages %}[{{ m.role }}|{{ m.content }}]{% endfor %}{{ effort }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": shipped}))
    msgs = [{"role": "user", "content": "hi"}]
    assert ChatTemplate.from_checkpoint(tmp_path).render(msgs, effort="low") == "[user|hi]low"
    assert render_chat(msgs, template=tmp_path, effort="low") == "[user|hi]low"
    # A template that does not read `effort` still gets the effort line, in the system message.
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": shipped.replace("{{ effort }}", "")})
    )
    sys_msgs = [{"role": "system", "content": "Be brief."}, *msgs]
    assert render_chat(msgs, template=tmp_path, effort="high") == "[system|Reasoning: high][user|hi]"
    assert (
        render_chat(sys_msgs, template=tmp_path, effort="low")
        == "[system|Be brief.\n\nReasoning: low][user|hi]"
    )
    assert render_chat(sys_msgs, template=tmp_path) == "[system|Be brief.][user|hi]"
    # chat_template.jinja, as newer exports write it, takes precedence over the config entry.
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert render_chat(msgs, template=tmp_path) == "J1"
    # A directory without any template falls back to the engine's default.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert render_chat(msgs, template=empty) == render_chat(msgs)


def test_named_templates_and_broken_templates(tmp_path):
    cfg = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert ChatTemplate.from_checkpoint(tmp_path).render([]) == "D"
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatTemplateError, match="refused the messages: no system role"):
        ChatTemplate("{{ raise_exception('no system role') }}").render([])


@pytest.mark.parametrize(
    "source", ["{{ messages.__class__.__mro__[1].__subclasses__() }}", "{{ messages.append(1) }}"]
)
def test_template_runs_sandboxed(source):
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="is unsafe"):
        ChatTemplate(source).render(msgs)
    assert msgs == [{"role": "user", "content": "x"}]


def test_transformers_renders_our_template_identically():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    source = ChatTemplate.default().source
    hf = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")), chat_template=source
    )
    msgs = normalize_messages(CONVERSATION)
    for effort in (None, "low"):
        ours = render_chat(CONVERSATION, TOOLS, effort=effort)
        theirs = hf.apply_chat_template(
            msgs, tools=TOOLS, effort=effort, add_generation_prompt=True, tokenize=False
        )
        assert theirs == ours


def test_image_layout_and_expansion():
    layout = image_token_layout(2, [False, True])
    assert layout == (
        "<patch_start>" + "<im_patch>" * 81 + "<patch_end>"
        "<patch_start>" + "<im_patch>" * 81 + "<patch_end><patch_newline>"
        "<im_start>" + "<im_patch>" * 169 + "<im_end>"
    )
    text = render_chat(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "vs"}, {"type": "image"}]}]
    )
    assert text.count(IMAGE_PLACEHOLDER) == 2
    expanded = expand_image_placeholders(text, [image_token_layout(), layout])
    assert expanded.count("<im_patch>") == 169 + 2 * 81 + 169
    assert "<im_end>vs<patch_start>" in expanded
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        expand_image_placeholders(text, [layout])


def test_encode_chat_with_a_step_tokenizer(tmp_path):
    from advisor.engine.text.chat import encode_chat
    from advisor.engine.text.tokenizer import build_step_tokenizer

    tok = build_step_tokenizer(tmp_path, vocab_size=300)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    layout = image_token_layout(1, [True])
    ids = encode_chat(tok, msgs, effort="low", image_layouts=[layout])
    patch = tok.token_to_id("<im_patch>")
    assert ids.count(patch) == 81 + 169
    for marker in ("<|im_start|>", "<|im_end|>", "<think>", "<patch_start>", "<patch_newline>", "<im_start>"):
        assert tok.token_to_id(marker) in ids, marker
    assert tok.decode(ids) == expand_image_placeholders(render_chat(msgs, effort="low"), [layout])
    with pytest.raises(ValueError, match="1 image placeholders but 0 images"):
        encode_chat(tok, msgs)


def test_parsed_output_goes_back_into_the_history():
    completion = (
        "check the file\n</think>\nLooking.\n<tool_call>\n<function=crop>\n<parameter=path>\nr.png\n</parameter>\n"
        "<parameter=box>\n[0, 0, 5, 5]\n</parameter>\n</function>\n</tool_call><|im_end|>"
    )
    message = parse_output(completion, TOOLS).to_message()
    assert message["reasoning_content"] == "check the file" and message["content"] == "Looking."
    history = [{"role": "user", "content": "go"}, message]
    text = render_chat(history, TOOLS, add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n" + completion + "\n")
