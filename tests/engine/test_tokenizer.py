"""advisor.engine.text.tokenizer: the Step tokenizer files we build, load, and hand to transformers."""

from __future__ import annotations

import json

import pytest
from advisor.engine.text.tokenizer import (
    CHAT_MARKERS,
    STEP_SPECIAL_TOKENS,
    StepTokenizer,
    TokenizerError,
    build_step_tokenizer,
    load_tokenizer,
)

CHAT_TEXT = (
    "<|im_start|>system\nReasoning: low<|im_end|>\n<|im_start|>user\nWhat is 6 x 7? <im_patch> ünïcödé 敏捷<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nmultiply\n</think>\n<tool_call>\n<function=python>\n<parameter=code>\n"
    "print(6*7)\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
    "<|im_start|>tool_response\n<tool_response>42</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_step_tokenizer(d, vocab_size=600)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir) -> StepTokenizer:
    return load_tokenizer(tok_dir)


def test_every_marker_is_one_id_and_text_round_trips(tok):
    ids = tok.special_ids
    assert set(ids) == set(STEP_SPECIAL_TOKENS)
    assert len(set(ids.values())) == len(ids)
    for marker, tid in ids.items():
        assert tok.encode(marker) == [tid]
        # inside running text too, with no space needed around it
        assert tid in tok.encode(f"abc{marker}def")
    encoded = tok.encode(CHAT_TEXT)
    assert tok.decode(encoded) == CHAT_TEXT
    assert encoded.count(ids["<|im_start|>"]) == CHAT_TEXT.count("<|im_start|>")
    assert encoded.count(ids["<im_patch>"]) == 1


def test_eos_pad_and_skip_special(tok):
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_ids == [tok.special_ids["<|im_end|>"]]
    assert tok.pad_token_id == tok.special_ids["<|endoftext|>"]
    shown = tok.decode(tok.encode(CHAT_TEXT), skip_special_tokens=True)
    # control tokens go, the markers the chat parser reads stay
    assert "<|im_start|>" not in shown and "<im_patch>" not in shown
    for marker in CHAT_MARKERS:
        if marker in CHAT_TEXT:
            assert marker in shown
    assert tok.count("") == 0 and tok.count("hello") == len(tok.encode("hello"))


def test_transformers_loads_our_files_and_agrees(tok_dir, tok):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    auto = AutoTokenizer.from_pretrained(tok_dir)
    for text in (CHAT_TEXT, "plain text", "  leading spaces\n\ttabs", "<think>x</think>"):
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert auto.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.eos_token_id == tok.eos_token_id
    assert hf.pad_token_id == tok.pad_token_id
    assert len(hf) == tok.vocab_size
    assert hf.convert_tokens_to_ids("<im_patch>") == tok.special_ids["<im_patch>"]

    # the shipped chat template renders the same text through transformers as through us
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 3."},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "use the tool",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    tools = [
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
    ]
    ours = tok.apply_chat_template(messages, tools, tokenize=False)
    theirs = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n<think>\n")
    assert tok.apply_chat_template(messages, tools) == tok.encode(ours)


def test_shipped_template_wins_and_chat_template_jinja_first(tmp_path):
    build_step_tokenizer(tmp_path, chat_template="{{ messages[0].content }}|cfg")
    tok = load_tokenizer(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi|cfg"
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}|file")
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template == "{{ messages[0].content }}|file"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi|file"


def test_without_a_template_the_default_step_template_is_used(tmp_path):
    build_step_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template is None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], effort="high", tokenize=False)
    assert (
        text
        == "<|im_start|>system\nReasoning: high<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )


def test_bad_directories_give_one_line_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot load") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
    build_step_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(tmp_path)
    build_step_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no token '<nope>'"):
        load_tokenizer(tmp_path).require_id("<nope>")


def test_command_line_trains_on_text_files(tmp_path, capsys):
    from advisor.engine.text.tokenizer import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("zebra crossing zebra crossing zebra\n" * 20 + "<|im_start|>user\nzebra<|im_end|>\n")
    assert main([str(tmp_path / "out"), str(corpus), "--vocab-size", "300"]) == 0
    tok = load_tokenizer(tmp_path / "out")
    assert f"({tok.vocab_size} ids)" in capsys.readouterr().out and tok.vocab_size <= 300
    assert len(tok.encode("zebra")) == 1  # learned from the given corpus, not the built-in one
    assert main([str(tmp_path / "out2"), str(tmp_path / "missing.txt")]) == 2
    assert "corpus file not found" in capsys.readouterr().out


def test_digit_groups_are_whole_tokens_wherever_a_number_appears(tmp_path):
    """digit_group=3: runs of digits cut into threes from the left, every group one token on top of
    vocab_size, the same ids in code, a tool response and an answer; transformers tokenizes the same."""
    from transformers import AutoTokenizer

    build_step_tokenizer(tmp_path, ["print(263 * 761)\nAnswer: 42"], vocab_size=300, digit_group=3)
    tok = load_tokenizer(tmp_path)

    def pieces(text: str) -> list[str]:
        return [tok.decode([i]) for i in tok.encode(text)]

    assert pieces("60263857872") == ["602", "638", "578", "72"]
    assert pieces("1000007") == ["100", "000", "7"]
    assert [p for p in pieces("x 12.05 -7") if p.isdigit()] == ["12", "05", "7"]
    for n in ("0", "7", "09", "99", "000", "431", "999"):
        assert pieces(n) == [n]
    number = tok.encode("60263857872")
    for text in ("print(60263857872)", "<tool_response>60263857872\n", "Answer: 60263857872"):
        ids = tok.encode(text)
        assert any(ids[i : i + len(number)] == number for i in range(len(ids)))
        assert tok.decode(ids) == text
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(CHAT_TEXT + " 60263857872", add_special_tokens=False) == tok.encode(
        CHAT_TEXT + " 60263857872"
    )
