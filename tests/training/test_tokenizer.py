"""The project tokenizer: trained on the traces, every Step marker one id, lossless, loadable by transformers."""

from __future__ import annotations

from advisor.engine.text.tokenizer import CHAT_MARKERS, STEP_SPECIAL_TOKENS, load_tokenizer

from training.traces import encode_sample


def test_specials_are_single_fixed_ids(tok_dir):
    tok = load_tokenizer(tok_dir)
    for i, marker in enumerate(STEP_SPECIAL_TOKENS):
        assert tok.token_to_id(marker) == i
        assert tok.encode(f"x{marker}y").count(i) == 1
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


def test_samples_round_trip(tok_dir, all_samples):
    tok = load_tokenizer(tok_dir)
    for s in all_samples:
        ids, labels = encode_sample(tok, s)
        assert tok.decode(ids) == s.prompt + s.target
        n = labels.count(-100)
        assert labels[n:] == ids[n:] and tok.decode(ids[n:]) == s.target
        # chat markers survive a decode that drops special tokens: the parser still sees reasoning and calls
        kept = tok.decode(ids[n:], skip_special_tokens=True)
        assert kept == s.target.removesuffix("<|im_end|>")
        assert all(m in kept for m in CHAT_MARKERS if m in s.target)


def test_trained_on_the_traces(tok_dir, all_samples, boot_tokenizer):
    """Merges learned from the traces: the project vocabulary encodes them far shorter than bytes."""
    tok = load_tokenizer(tok_dir)
    text = all_samples[0].prompt
    assert len(tok.encode(text)) < len(text.encode()) / 3
    assert len(tok.encode(text)) < len(boot_tokenizer.encode(text))


def test_transformers_agrees(tok_dir, all_samples):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    tok = load_tokenizer(tok_dir)
    text = all_samples[-1].prompt + all_samples[-1].target
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_tokenizer_build_is_reproducible(all_samples, tmp_path):
    from training.tokenizer import build_project_tokenizer

    a = build_project_tokenizer(tmp_path / "a", all_samples, vocab_size=500)
    b = build_project_tokenizer(tmp_path / "b", all_samples, vocab_size=500)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    assert a.vocab_size == b.vocab_size == 500
