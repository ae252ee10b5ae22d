"""What a client sees of a sequence's tokens (stop strings held back and cut) and the sampler's logit
adjustments and log-probabilities, on their own."""

from __future__ import annotations

import math

import pytest
import torch
from advisor.engine.serving.outputs import CompletionLogprobs, TextOutput
from advisor.engine.serving.sampler import sample_next
from advisor.engine.serving.sequence import SamplingParams, Sequence, TokenLogprobs


class CharTokenizer:
    """One token per character (id = code point), 0 is end-of-turn."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i)


def released(text: str, stop=(), eos=False):
    out = TextOutput(CharTokenizer(), (0,), stop)
    tok = CharTokenizer()
    deltas = [out.add(t) for t in tok.encode(text) + ([0] if eos else [])]
    if not out.stopped:
        deltas.append(out.flush())
    return deltas, out


def test_text_is_cut_before_the_first_stop_string_and_nothing_past_it_is_released():
    deltas, out = released("say a STAR then STOP and more", stop=["STOP", "then S"])
    assert "".join(deltas) == "say a STAR "  # "then S" comes first
    assert out.stopped and out.num_tokens == len("say a STAR then S")
    # a prefix of a stop string is held back until it can no longer become one
    deltas, out = released("a STAR b", stop=["STOP"])
    assert "".join(deltas) == "a STAR b" and not out.stopped
    assert deltas[len("a S") - 1] == "" and deltas[len("a STA") - 1] == "STA"
    deltas, out = released("abc", stop=["bcd"])
    assert deltas == ["a", "", "", "bc"]  # the tail is released once the sequence ends by itself


def test_without_stop_strings_every_token_is_released_and_the_stop_token_counted():
    deltas, out = released("hello", eos=True)
    assert deltas == list("hello") + ["", ""] and out.num_tokens == 6


def test_completion_logprobs_shape_and_offsets():
    lp = CompletionLogprobs(CharTokenizer())
    first = lp.take([(ord("a"), TokenLogprobs(-0.5, ((ord("b"), -0.1),)))])
    second = lp.take([(ord("c"), TokenLogprobs(-1.0, ()))])
    assert first == {
        "tokens": ["a"],
        "token_logprobs": [-0.5],
        "top_logprobs": [{"b": -0.1, "a": -0.5}],  # the k most likely and the sampled token
        "text_offset": [0],
    }
    assert second["text_offset"] == [1] and second["top_logprobs"] == [{"c": -1.0}]


def test_penalties_and_bias_change_the_logits_as_vllm_applies_them():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.5]])
    seq = Sequence([4], SamplingParams(presence_penalty=0.5, frequency_penalty=1.0, logit_bias=((0, 10.0),)))
    seq.output = [3, 3, 2]
    # token 3: 3 - 2*1.0 - 0.5 = 0.5; token 2: 2 - 1.0 - 0.5 = 0.5; token 0: 0 + 10 = 10
    assert sample_next(logits, [seq]) == {seq.id: 0}
    plain = Sequence([4], SamplingParams())
    plain.output = [3, 3, 2]
    assert sample_next(logits, [plain]) == {plain.id: 3} and plain.next_logprobs is None


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_are_the_raw_logits_log_softmax_whatever_the_sampling(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    seqs = [Sequence([1], SamplingParams(temperature=temperature, seed=1, logprobs=k)) for k in (0, 5, None)]
    seqs[1].params = SamplingParams(temperature=temperature, seed=1, logprobs=5, frequency_penalty=2.0)
    seqs[1].output = [int(logits[1].argmax())]  # penalised, yet reported from the raw logits
    picked = sample_next(logits, seqs)
    ref = torch.log_softmax(logits, -1)
    for i, s in enumerate(seqs[:2]):
        lp = s.next_logprobs
        assert math.isclose(lp.logprob, float(ref[i, picked[s.id]]), abs_tol=1e-6)
        assert [t for t, _ in lp.top] == ref[i].topk(s.params.logprobs).indices.tolist()
        assert all(math.isclose(v, float(ref[i, t]), abs_tol=1e-6) for t, v in lp.top)
    assert seqs[2].next_logprobs is None


def test_the_windowed_detokenizer_releases_exactly_the_whole_decode(tmp_path):
    from advisor.engine.serving.outputs import Detokenizer
    from advisor.engine.text.tokenizer import build_step_tokenizer

    tok = build_step_tokenizer(tmp_path, vocab_size=400)
    gen = torch.Generator().manual_seed(0)
    texts = ["héllo wörld € 2 + 3 = 5", "<think>\nplain</think> ünïcödé", "日本語のテキスト"]
    for text in texts:  # a character split over tokens is released whole, once complete
        d = Detokenizer(tok)
        deltas = [d.add(t) for t in tok.encode(text)]
        assert "".join(deltas) == text and not any("\ufffd" in x for x in deltas)
    for _ in range(5):  # any ids at all (pieces that never make a character): the same text as one decode
        ids = torch.randint(3, tok.vocab_size, (40,), generator=gen).tolist()
        d = Detokenizer(tok)
        assert "".join(d.add(t) for t in ids) + d.flush() == tok.decode(ids)
